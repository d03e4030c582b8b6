"""Branched multi-task networks: a backbone cut into stages, and a tree of stage copies per spec.

`split_stages(name, ...)` (or `backbone_stages(backbone)`) cuts a timm features-only CNN into an
ordered `nn.ModuleList` of `Stage`s: stage 0 maps the images to feature level 0, stage i maps
feature i-1 to feature i, always NCHW, so that running them in sequence gives the adapter's
features exactly.  `BranchedDecoder` builds one copy of stage k per task group of a
`BranchingSpec` at stage k, every copy starting from the same backbone weights, and feeds each
task's multi-scale features (taken along its path through the tree) to its own FPN neck and head.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mtvision.models.backbones import Backbone, BackboneError, create_backbone
from mtvision.models.branching_spec import BranchingSpec, SpecError, as_spec
from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.tasks import Task


class Stage(nn.Module):
    """One backbone stage: an NCHW map (the images for stage 0) in, the next NCHW feature map out.

    `layers` are the timm modules of the stage, run in order; a tuple output at the end keeps its
    first element (timm's feature tap); NHWC models (Swin) are permuted at the stage boundaries.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        *,
        nhwc_in: bool = False,
        nhwc_out: bool = False,
        channels_last_input: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.nhwc_in, self.nhwc_out = nhwc_in, nhwc_out
        self.channels_last_input = channels_last_input
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last_input:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.nhwc_in:
            x = x.permute(0, 2, 3, 1)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for m in self.layers.values():
            if use_ckpt and not getattr(m, "inplace", False) and isinstance(x, Tensor) and x.requires_grad:
                x = checkpoint(m, x, use_reentrant=False)
            else:
                x = m(x)
        if isinstance(x, (tuple, list)):
            x = x[0]
        return x.permute(0, 3, 1, 2) if self.nhwc_out else x


class BackboneStages(NamedTuple):
    """A backbone cut into stages, with each stage's output channels and stride."""

    stages: nn.ModuleList
    channels: list[int]
    strides: list[int]


def backbone_stages(backbone: Backbone) -> BackboneStages:
    """Cut `backbone` into `Stage`s (sharing its modules) that reproduce its `forward` in sequence.

    Supports timm's sequential feature wrappers: FeatureListNet (ResNet, ConvNeXt, RegNet, Swin, ...)
    and the EfficientNet/MobileNet feature classes; raises BackboneError for any other.
    """
    body = backbone.body
    if isinstance(body, FeatureDictNet):
        if getattr(body, "concat", False):
            raise BackboneError(f"backbone {backbone.name!r} concatenates tuple features; it cannot be cut into stages")
        items = list(body.items())
        ends = [i for i, (n, _) in enumerate(items) if n in body.return_layers]
        parts = [dict(items[s:e]) for s, e in _spans([ends[lv] for lv in backbone.levels])]
    elif hasattr(body, "_stage_out_idx") and hasattr(body, "blocks") and getattr(body, "feature_hooks", 1) is None:
        stem = [("conv_stem", body.conv_stem), ("bn1", body.bn1)] + (
            [("act1", body.act1)] if hasattr(body, "act1") else []
        )
        mods: list[list[tuple[str, nn.Module]]] = [stem] + [[(f"blocks_{i}", b)] for i, b in enumerate(body.blocks)]
        positions = sorted(body._stage_out_idx)
        parts = [dict(sum(mods[s:e], [])) for s, e in _spans([positions[lv] for lv in backbone.levels])]
    else:
        why = (
            "its blocks are run inside forward_intermediates (ViT-style), not as a module sequence"
            if isinstance(body, FeatureGetterNet)
            else "its features-only wrapper is not a sequential module list"
        )
        raise BackboneError(
            f"backbone {backbone.name!r} ({type(body).__name__}) cannot be cut into stages: {why}; branched models "
            "support timm CNNs with FeatureListNet features (ResNet, ConvNeXt, RegNet, Swin, ...) and "
            "EfficientNet/MobileNet"
        )
    stages = nn.ModuleList(
        Stage(
            p,
            nhwc_in=backbone.nhwc and i > 0,
            nhwc_out=backbone.nhwc,
            channels_last_input=backbone.channels_last and i == 0,
        )
        for i, p in enumerate(parts)
    )
    for s in stages:
        s.grad_checkpointing = backbone.grad_checkpointing
    return BackboneStages(stages, list(backbone.channels), list(backbone.strides))


def _spans(ends: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, stop)) module ranges ending after each of `ends`."""
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [(s, e + 1) for s, e in zip(starts, ends)]


def split_stages(name: str, **kwargs: Any) -> BackboneStages:
    """Build timm model `name` with `create_backbone(name, **kwargs)` (local weights, out_indices, ...)
    and cut it into stages (see `backbone_stages`)."""
    return backbone_stages(create_backbone(name, **kwargs))


def run_stages(stages: Sequence[nn.Module], images: Tensor) -> list[Tensor]:
    """Run `stages` one after the other on `images`; every stage's output, in order."""
    out, x = [], images
    for stage in stages:
        x = stage(x)
        out.append(x)
    return out


class BranchedDecoder(MultiTaskDecoder):
    """A tree-structured multi-task network built from a `BranchingSpec`.

    Stage k of the backbone exists once per group of the spec at stage k (`self.branches[k][g]`),
    every copy initialised from the same backbone weights.  Task t's features are the outputs of
    the copies on its path; t has its own FPN neck and head.  `forward(images, tasks)` runs only
    the copies on the selected tasks' paths, each once.

    Shared representation: the feature maps where the stages all tasks share hand over to the rest
    (the necks' inputs from each shared stage, and the last shared stage's output, which also feeds
    the first branched stage); none when the tasks split at stage 0.  Task parameters: the copies
    only task t uses, t's neck and head; copies used by two or more tasks are shared.

    Options:
        spec: the branching spec: a mapping (as in a spec file) or a path to a YAML/JSON spec file.
        neck_channels, head_channels, norm: as for HPS (each task's neck is HPS's neck).
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        spec: Mapping[str, Any] | str | os.PathLike | BranchingSpec,
        neck_channels: int = 128,
        head_channels: int = 64,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        self.spec = as_spec(spec)
        backbone = make_backbone()
        split = backbone_stages(backbone)
        self.spec.check(tasks=list(tasks), num_stages=len(split.stages), backbone=backbone.name)
        if list(self.spec.tasks) != list(tasks):  # same set; follow the model's task order
            self.spec = BranchingSpec(tuple(tasks), self.spec.stages, self.spec.backbone)
        self.channels, self.strides = split.channels, split.strides
        self.branches = nn.ModuleList(
            nn.ModuleList(stage if g == 0 else copy.deepcopy(stage) for g in range(self.spec.num_copies(k)))
            for k, stage in enumerate(split.stages)
        )
        self.necks = nn.ModuleDict(
            {t: MultiScaleNeck(self.channels, self.strides, neck_channels, norm=norm) for t in tasks}
        )
        self.heads = nn.ModuleDict(
            {n: TaskHead(neck_channels, t.out_channels, head_channels, norm=norm) for n, t in tasks.items()}
        )
        self.output_stride = min(self.strides)

    def stage_copy(self, stage: int, group: int) -> nn.Module:
        """The copy of backbone stage `stage` that group `group` of the spec runs."""
        return self.branches[stage][group]

    def task_features(self, images: Tensor, tasks: Sequence[str]) -> tuple[dict[str, list[Tensor]], list[Tensor]]:
        """Per selected task, its multi-scale backbone features (fine to coarse) along its path, and
        the shared representation (see the class docstring)."""
        spec, depth = self.spec, self.spec.shared_depth()
        for t in tasks:
            spec.group_of(t, 0)  # SpecError for a task the model does not have
        x, trunk = images, []
        for k in range(depth):  # the stages every task shares: one copy each
            x = self.branches[k][0](x)
            trunk.append(x)
        # the shared maps handed to the rest, as views: before the last shared stage they feed only the
        # necks (the next stage reads the stage output itself); the last one feeds the necks and the
        # first branched stage
        shared = graph_boundary(trunk)
        outputs: list[dict[int, Tensor]] = [{0: s} for s in shared]
        for k in range(depth, spec.num_stages):
            level = {}
            for g in sorted({spec.group_of(t, k) for t in tasks}):
                level[g] = self.branches[k][g](images if k == 0 else outputs[k - 1][spec.parent(k, g)])
            outputs.append(level)
        feats: dict[str, list[Tensor]] = {}
        for t in tasks:
            feats[t] = [shared[k] if k < depth else outputs[k][spec.group_of(t, k)] for k in range(spec.num_stages)]
        return feats, shared

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        feats, shared = self.task_features(images, tasks)
        return model_output({t: self.heads[t](self.necks[t](feats[t])) for t in tasks}, shared=shared)

    def copy_users(self, stage: int, group: int) -> tuple[str, ...]:
        """The tasks whose paths run through copy `group` of `stage`."""
        return self.spec.stages[stage][group]

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.tasks:
            raise SpecError(f"unknown task {task!r} (model tasks: {', '.join(self.tasks)})")
        for k in range(self.spec.num_stages):
            g = self.spec.group_of(task, k)
            if self.copy_users(k, g) == (task,):
                yield from self.branches[k][g].parameters()
        yield from self.necks[task].parameters()
        yield from self.heads[task].parameters()
