"""Multi-modal distillation decoder: PAD-Net (Xu et al., "PAD-Net: Multi-Tasks Guided Prediction-and-
Distillation Network for Simultaneous Depth Estimation and Scene Parsing", CVPR 2018), with an
MTI-Net-style multi-scale option (Vandenhende et al., ECCV 2020).

Single scale (PAD-Net): the backbone levels are fused by the FPN neck into the shared map; per task,
two 3x3 conv-BN-ReLU give the intermediate feature F_t and a 1x1 conv the intermediate prediction
(deep supervision, the output's `deep_supervision[t]` in training).  Attention-guided message passing (the paper's
distillation variant C) refines every task's feature with messages from the other tasks:

    F_t^o = F_t + sum_{s != t} G_t * (W_s F_s),     G_t = sigmoid(W_g^t F_t)

with W_s a 3x3 conv per source task and W_g^t a 3x3 conv per target task, as in the paper (one
message transform per source, one gate per target).  A per-task head decodes F_t^o.

Multi-scale (`multi_scale=True`, MTI-Net style): the same prediction-and-distillation runs at every
backbone level (aux predictions at every scale, `aux[t]` is a list fine to coarse); a feature
propagation step feeds each scale the upsampled intermediate features of all tasks from the next
coarser scale (concatenated, 1x1 conv-BN-ReLU, added to that scale's input: a simplified form of
MTI-Net's feature propagation module, without its per-task squeeze-and-excitation); the distilled
features of all scales are upsampled to the finest, concatenated and fused per task by a 3x3
conv-BN-ReLU before the head.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.decoders.invpt import check_strides, crop_to, pad_to_multiple
from mtvision.models.heads import ConvBNReLU, MultiScaleNeck, TaskHead, make_norm, resize_to
from mtvision.tasks import Task


class AttentionDistillation(nn.Module):
    """F_t <- F_t + sum_{s != t} sigmoid(W_g^t F_t) * (W_s F_s) for T same-shaped task features.

    With one task there is nothing to distil: the module holds no parameters and is the identity.
    """

    def __init__(self, task_names: Sequence[str], channels: int):
        super().__init__()
        names = list(task_names)
        multi = len(names) > 1
        self.messages = nn.ModuleDict({t: nn.Conv2d(channels, channels, 3, padding=1) for t in names} if multi else {})
        self.gates = nn.ModuleDict({t: nn.Conv2d(channels, channels, 3, padding=1) for t in names} if multi else {})

    def forward(self, feats: dict[str, Tensor], targets: Sequence[str]) -> dict[str, Tensor]:
        """Distilled features of `targets` (each reads every other task's feature in `feats`)."""
        if len(feats) < 2:
            return {t: feats[t] for t in targets}
        sources = {s for t in targets for s in feats if s != t}
        messages = {s: self.messages[s](feats[s]) for s in sources}
        out = {}
        for t in targets:
            gate = torch.sigmoid(self.gates[t](feats[t]))
            out[t] = feats[t] + sum(gate * messages[s] for s in feats if s != t)
        return out


class _ScaleBranch(nn.Module):
    """Prediction-and-distillation at one scale: per-task features, aux predictions, distillation."""

    def __init__(self, tasks: dict[str, Task], in_channels: int, channels: int, norm: str):
        super().__init__()
        self.features = nn.ModuleDict(
            {t: nn.Sequential(ConvBNReLU(in_channels, channels, norm=norm), ConvBNReLU(channels, channels, norm=norm)) for t in tasks}
        )
        self.aux_heads = nn.ModuleDict({t: nn.Conv2d(channels, s.out_channels, 1) for t, s in tasks.items()})
        self.distill = AttentionDistillation(list(tasks), channels)

    def forward(self, x: Tensor, tasks: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(all tasks' intermediate features, requested tasks' aux predictions, their distilled features)."""
        feats = {t: f(x) for t, f in self.features.items()}
        aux = {t: self.aux_heads[t](feats[t]) for t in tasks} if self.training else {}
        return feats, aux, self.distill(feats, tasks)


class DistillationDecoder(MultiTaskDecoder):
    """PAD-Net (default) or MTI-Net-style multi-scale (`multi_scale=True`) distillation decoder; see
    the module docstring for the computation.

    Shared representation: single scale, the fused neck map (branch points: the backbone
    levels feeding the neck); multi-scale, the backbone levels.  Every
    task's loss flows through it; the distillation's message convs (W_s) come after it and are
    shared, so feature-level gradient calibration does not reach them: use the 'params' level.
    Task parameters: task t's aux heads, gates W_g^t, (multi-scale) fusion conv, and head.  The
    intermediate feature blocks feed other tasks' distillation and are shared.
    `forward(images, [t])` computes every task's intermediate features (t's distillation reads them)
    but only t's messages' consumers, aux output and head.

    Options:
        neck_channels: width of the fused neck map (single scale) / per-level projections (multi).
        task_channels: width of the intermediate task features (the distilled features too).
        head_channels: hidden width of each task head.
        multi_scale: MTI-Net-style distillation at every backbone level.
        norm: "bn" or "gn".
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        neck_channels: int = 128,
        task_channels: int = 128,
        head_channels: int = 64,
        multi_scale: bool = False,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        self.backbone = make_backbone()
        strides, channels = list(self.backbone.strides), list(self.backbone.channels)
        check_strides(strides, "padnet")
        self.size_divisor = max(strides)
        self.output_stride = min(strides)
        self.multi_scale = multi_scale
        self.task_names = list(tasks)
        names = self.task_names
        if multi_scale:
            self.neck = None
            self.lateral = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, neck_channels, 1, bias=False), make_norm(norm, neck_channels)) for c in channels
            )
            self.propagate = nn.ModuleList(
                ConvBNReLU(task_channels * len(names), neck_channels, kernel_size=1, norm=norm) for _ in channels[:-1]
            )
            self.scales = nn.ModuleList(_ScaleBranch(tasks, neck_channels, task_channels, norm) for _ in channels)
            self.aggregate = nn.ModuleDict({t: ConvBNReLU(task_channels * len(channels), task_channels, norm=norm) for t in names})
        else:
            self.neck = MultiScaleNeck(channels, strides, neck_channels, norm=norm)
            self.scales = nn.ModuleList([_ScaleBranch(tasks, neck_channels, task_channels, norm)])
        self.heads = nn.ModuleDict({t: TaskHead(task_channels, s.out_channels, head_channels, norm=norm) for t, s in tasks.items()})

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.size_divisor)
        psize = tuple(padded.shape[-2:])
        feats = graph_boundary(self.backbone(padded))
        if self.neck is not None:
            branches = feats
            shared = graph_boundary([self.neck(feats)])
            _, aux, final = self.scales[0](shared[0], tasks)
            aux_out = {t: [crop_to(a, psize, size)] for t, a in aux.items()}
        else:
            branches, shared = [], feats
            final, aux_out = self._multi_scale(feats, tasks, psize, size)
        out = {t: crop_to(self.heads[t](final[t]), psize, size) for t in tasks}
        deep = aux_out if self.training else {}
        return model_output(out, deep_supervision=deep, shared=shared, branches=branches)

    def _multi_scale(self, feats: list[Tensor], tasks: Sequence[str], psize, size):
        per_scale: list[dict[str, Tensor]] = [{} for _ in feats]
        aux_out: dict[str, list[Tensor]] = {t: [] for t in tasks}
        below: dict[str, Tensor] | None = None
        for i in range(len(feats) - 1, -1, -1):  # coarse to fine
            x = self.lateral[i](feats[i])
            if below is not None:
                carried = torch.cat([resize_to(below[t], x.shape[-2:]) for t in self.task_names], 1)
                x = x + self.propagate[i](carried)
            below, aux, per_scale[i] = self.scales[i](x, tasks)
            for t, a in aux.items():
                aux_out[t].insert(0, crop_to(a, psize, size))
        finest = feats[0].shape[-2:]
        final = {t: self.aggregate[t](torch.cat([resize_to(s[t], finest) for s in per_scale], 1)) for t in tasks}
        return final, (aux_out if self.training else {})

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for branch in self.scales:
            yield from branch.aux_heads[task].parameters()
            if task in branch.distill.gates:
                yield from branch.distill.gates[task].parameters()
        if self.multi_scale:
            yield from self.aggregate[task].parameters()
        yield from self.heads[task].parameters()
