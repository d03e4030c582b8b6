"""MTI-Net (Vandenhende et al., "MTI-Net: Multi-Scale Task Interaction Networks for Multi-Task
Learning", ECCV 2020), as released in SimonVandenhende/Multi-Task-Learning-PyTorch (HRNet-18).

The decoder works on the backbone levels at their own widths (HRNet-W18: 18, 36, 72, 144 channels
at strides 4 to 32), coarse to fine.  Every interpolation is bilinear with align_corners=False;
BatchNorm eps 1e-5; `BasicBlock` is conv3x3-BN-ReLU-conv3x3-BN plus the input (through a 1x1
conv + BN projection when the widths differ), then ReLU.

1. Per-scale initial predictions (`ScalePredictions`), at the coarsest level L-1: per task, two
   BasicBlocks on the level; at every finer level s: per task, two BasicBlocks (the first
   projecting to C_s) on cat(level s, that task's propagated feature upsampled x2).  A 1x1
   convolution per task gives the scale-s prediction (deep supervision at every scale).
2. Feature propagation (`FeaturePropagation`, after every scale but the finest): the N task
   features (C channels each) are concatenated (S = N C channels); a shared non-linearity
   (BasicBlock S -> S/4 with projection, BasicBlock S/4, 1x1 conv S/4 -> S with bias) gives
   scores that are soft-maxed over groups of N consecutive channels (channel c in group c // N)
   and multiply the concatenation; a BasicBlock reduces it to C channels; per task a
   squeeze-and-excitation (`SqueezeExcitation`: global mean, Linear C -> C/16, ReLU, Linear,
   sigmoid, channel scale) of it is added to that task's feature: the task's propagated feature.
3. Per-scale distillation of the scale-s task features (before propagation): PAD-Net's
   multi-modal distillation at C_s channels (`MultiModalDistillation` of `padnet.py`).
4. Aggregation per task (`LevelAggregation`, the release's HighResolutionHead): the distilled
   features of all scales resized to the finest, concatenated, conv1x1 (bias) - BN - ReLU -
   conv1x1 to the task's outputs, at the finest level's resolution.

Differences with the release: inputs whose size is not a multiple of the largest stride are
zero-padded to one and the outputs cropped back (the release requires such sizes); the
squeeze-and-excitation's hidden width is at least 1 (C/16 rounds to 0 below 16 channels, never
the case in the release); auxiliary-only tasks (the NYUD "+edges_normals" variant) are not
modelled.  Any backbone whose consecutive levels halve in resolution fits; the release uses
HRNet-W18-small-v2 (timm `hrnet_w18_small_v2` with `feature_location: ''` and
`backbone.upsample_mode: bilinear`, the release HRNet's fuse upsampling).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.decoders.invpt import DecoderStrideError, check_strides, crop_to, pad_to_multiple
from mtvision.models.decoders.padnet import MultiModalDistillation
from mtvision.models.heads import resize_to
from mtvision.tasks import Task

SE_REDUCTION = 16


class BasicBlock(nn.Module):
    """conv3x3 (no bias) - BN - ReLU - conv3x3 (no bias) - BN, plus the input (through a 1x1 conv +
    BN projection when the widths differ), ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class SqueezeExcitation(nn.Module):
    """x * sigmoid(W2 relu(W1 mean_hw(x))) per channel, hidden width max(1, C // 16)."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.squeeze(x.mean(dim=(2, 3)))[:, :, None, None]


class ScalePredictions(nn.Module):
    """One scale's per-task refinement (two BasicBlocks) and 1x1 prediction conv."""

    def __init__(self, tasks: Mapping[str, Task], in_channels: int, channels: int):
        super().__init__()
        self.refinement = nn.ModuleDict({t: nn.Sequential(BasicBlock(in_channels, channels), BasicBlock(channels, channels)) for t in tasks})
        self.predictions = nn.ModuleDict({t: nn.Conv2d(channels, s.out_channels, 1) for t, s in tasks.items()})

    def forward(self, level: Tensor, propagated: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Every task's refined feature at this scale; `propagated`: the next coarser scale's
        propagated task features (None at the coarsest scale)."""
        out = {}
        for t, block in self.refinement.items():
            x = level if propagated is None else torch.cat([level, F.interpolate(propagated[t], scale_factor=2, mode="bilinear", align_corners=False)], 1)
            out[t] = block(x)
        return out


class FeaturePropagation(nn.Module):
    """MTI-Net's feature propagation module at one scale (see the module docstring, step 2)."""

    def __init__(self, task_names: Sequence[str], channels: int):
        super().__init__()
        self.task_names = list(task_names)
        shared = len(self.task_names) * channels
        self.non_linear = nn.Sequential(BasicBlock(shared, shared // 4), BasicBlock(shared // 4, shared // 4), nn.Conv2d(shared // 4, shared, 1))
        self.reduction = BasicBlock(shared, channels)
        self.se = nn.ModuleDict({t: SqueezeExcitation(channels) for t in self.task_names})

    def forward(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        concat = torch.cat([feats[t] for t in self.task_names], 1)
        b, c, h, w = concat.shape
        groups = (b, c // len(self.task_names), len(self.task_names), h, w)  # channel c in group c // N
        mask = torch.softmax(self.non_linear(concat).view(groups), dim=2)
        reduced = self.reduction((mask * concat.view(groups)).view(b, c, h, w))
        return {t: self.se[t](reduced) + feats[t] for t in self.task_names}


class LevelAggregation(nn.Sequential):
    """Levels resized to the first one's size and concatenated, then conv1x1 (bias) - BN - ReLU -
    conv1x1 to `out_channels` (the release's HighResolutionHead)."""

    def __init__(self, channels: Sequence[int], out_channels: int):
        total = sum(channels)
        super().__init__(nn.Conv2d(total, total, 1), nn.BatchNorm2d(total), nn.ReLU(), nn.Conv2d(total, out_channels, 1))

    def forward(self, levels: Sequence[Tensor]) -> Tensor:  # type: ignore[override]
        size = levels[0].shape[-2:]
        return super().forward(torch.cat([levels[0], *(resize_to(x, size) for x in levels[1:])], 1))


class MTINetDecoder(MultiTaskDecoder):
    """MTI-Net as released (see the module docstring for the computation).

    `scales[s]`, `distillation[s]`: per backbone level s (fine to coarse); `propagation[s - 1]`:
    the feature propagation from scale s to scale s - 1 (s >= 1).  Deep supervision: per task, the
    predictions of every scale, finest first (native resolutions; the objective resizes them).

    Shared representation: the backbone levels (every task's loss reaches all of them).  The
    per-scale refinements and the propagation modules come after it and are shared (every task's
    feature feeds every task's propagation and distillation), so feature-level gradient
    calibration does not reach them: use the 'params' level for those.  Task parameters: task t's
    per-scale prediction convs, the distillation messages into t, and t's aggregation head.
    `forward(images, [t])` computes every task's per-scale features, then only t's distillation,
    deep supervision and head.
    """

    def __init__(self, make_backbone: BackboneFactory, tasks: dict[str, Task]):
        super().__init__(tasks)
        self.backbone = make_backbone()
        strides, channels = list(self.backbone.strides), list(self.backbone.channels)
        check_strides(strides, "mtinet")
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise DecoderStrideError(f"decoder 'mtinet' needs levels that halve in resolution one after another, got strides {strides}")
        self.size_divisor = max(strides)
        self.task_names = list(tasks)
        last = len(channels) - 1
        self.scales = nn.ModuleList(
            ScalePredictions(tasks, c if s == last else c + channels[s + 1], c) for s, c in enumerate(channels)
        )
        self.propagation = nn.ModuleList(FeaturePropagation(self.task_names, c) for c in channels[1:])
        self.distillation = nn.ModuleList(MultiModalDistillation(self.task_names, c) for c in channels)
        self.heads = nn.ModuleDict({t: LevelAggregation(channels, s.out_channels) for t, s in tasks.items()})

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.size_divisor)
        psize = tuple(padded.shape[-2:])
        levels = graph_boundary(self.backbone(padded))
        per_scale: list[dict[str, Tensor]] = [{} for _ in levels]
        propagated = None
        for s in range(len(levels) - 1, -1, -1):  # coarse to fine
            per_scale[s] = self.scales[s](levels[s], propagated)
            if s > 0:
                propagated = self.propagation[s - 1](per_scale[s])
        distilled = [d(feats, tasks) for d, feats in zip(self.distillation, per_scale)]
        out = {t: crop_to(self.heads[t]([d[t] for d in distilled]), psize, size) for t in tasks}
        deep = {}
        if self.training:
            deep = {t: [crop_to(sc.predictions[t](f[t]), psize, size) for sc, f in zip(self.scales, per_scale)] for t in tasks}
        return model_output(out, deep_supervision=deep, shared=levels)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for scale in self.scales:
            yield from scale.predictions[task].parameters()
        for distillation in self.distillation:
            yield from distillation.target_parameters(task)
        yield from self.heads[task].parameters()
