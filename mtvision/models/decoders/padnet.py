"""PAD-Net (Xu et al., "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network for
Simultaneous Depth Estimation and Scene Parsing", CVPR 2018), as released in
SimonVandenhende/Multi-Task-Learning-PyTorch (the MTI-Net authors' code, HRNet-18 configs).

Layer by layer (every interpolation bilinear with align_corners=False, BatchNorm eps 1e-5):

1. Fuse: every backbone level resized to the finest level, concatenated (HRNet-W18: 18 + 36 + 72
   + 144 = 270 channels at stride 4), then a 1x1 convolution with bias, BN and ReLU (`FuseLevels`).
2. Initial predictions, per task t: two bottleneck blocks (`Bottleneck`, 1x1-3x3-1x1 at width
   head_channels / 4, output head_channels = 256; the first with a 1x1 conv + BN projection
   shortcut) give the task feature F_t, and a 1x1 convolution the initial prediction (deep
   supervision at the fused map's resolution).
3. Multi-modal distillation (`MultiModalDistillation`), one spatial-attention block per
   (target t, source s != t) pair, both 3x3 convolutions bias-free and both reading the source:

       D_t = F_t + sum_{s != t} conv_{t,s}(F_s) * sigmoid(attention_{t,s}(F_s))

4. Final heads, per task: two bottleneck blocks and a 1x1 convolution, at the fused map's resolution
   (the model resizes the prediction to the input size).

Differences with the release: the release needs input sizes that are multiples of the backbone's
largest stride (it trains at fixed 512x512 / 480x640); here other sizes are zero-padded to one and
the outputs cropped back (identical at those sizes).  The release's auxiliary-only tasks (its NYUD
"+edges_normals" variant, where normals and edges are distillation sources but not outputs) are not
modelled: every task is both.  The paper's distillation variants other than the released one are
not provided.  The release trains on HRNet-W18-small-v2 whose fuse layers upsample bilinearly
(`backbone.upsample_mode: bilinear` on timm's `hrnet_w18_small_v2`, whose own are nearest).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.decoders.invpt import check_strides, crop_to, pad_to_multiple
from mtvision.models.heads import resize_to
from mtvision.tasks import Task


class Bottleneck(nn.Module):
    """1x1 (to `width`) - 3x3 - 1x1 (to `out_channels`) convolutions, each bias-free with BN, ReLU
    between, added to the input (through a 1x1 conv + BN projection when the widths differ), ReLU."""

    def __init__(self, in_channels: int, width: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def bottlenecks(in_channels: int, channels: int) -> nn.Sequential:
    """Two `Bottleneck`s of width channels / 4 mapping `in_channels` to `channels`."""
    return nn.Sequential(Bottleneck(in_channels, channels // 4, channels), Bottleneck(channels, channels // 4, channels))


class SpatialAttentionMessage(nn.Module):
    """The message of one source feature to one target: conv(F_s) * sigmoid(attention(F_s)), both
    3x3 convolutions without bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.attention = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, source: Tensor) -> Tensor:
        return self.conv(source) * torch.sigmoid(self.attention(source))


class MultiModalDistillation(nn.Module):
    """D_t = F_t + sum over the other tasks s (in task order) of message_{t,s}(F_s), one
    `SpatialAttentionMessage` per (target, source) pair (`messages[t][s]`).  With one task it holds
    nothing and is the identity."""

    def __init__(self, task_names: Sequence[str], channels: int):
        super().__init__()
        self.task_names = list(task_names)
        self.messages = nn.ModuleDict(
            {t: nn.ModuleDict({s: SpatialAttentionMessage(channels) for s in self.task_names if s != t}) for t in self.task_names}
            if len(self.task_names) > 1
            else {}
        )

    def forward(self, feats: Mapping[str, Tensor], targets: Sequence[str]) -> dict[str, Tensor]:
        """Distilled features of `targets` from every task's feature in `feats`."""
        out = {}
        for t in targets:
            sources = [s for s in self.task_names if s != t]
            if not sources:
                out[t] = feats[t]
                continue
            messages = torch.stack([self.messages[t][s](feats[s]) for s in sources])
            out[t] = feats[t] + messages.sum(0)
        return out

    def target_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters of the messages into `task`."""
        if task in self.messages:
            yield from self.messages[task].parameters()


class FuseLevels(nn.Module):
    """Every level resized (bilinear) to the first level's size, concatenated, then a 1x1
    convolution with bias, BN and ReLU (the release's HighResolutionFuse)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int | None = None):
        super().__init__()
        total = sum(in_channels)
        out = total if out_channels is None else out_channels
        self.proj = nn.Sequential(nn.Conv2d(total, out, 1), nn.BatchNorm2d(out), nn.ReLU(inplace=True))
        self.out_channels = out

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        size = levels[0].shape[-2:]
        return self.proj(torch.cat([levels[0], *(resize_to(x, size) for x in levels[1:])], 1))


class PADNetDecoder(MultiTaskDecoder):
    """PAD-Net as released (see the module docstring for the computation).

    Shared representation: the fused map (branch points: the backbone levels feeding the fuse).
    Every task's loss flows through it.  The initial task blocks come after it and are shared
    (every task's distillation reads every task's feature), so feature-level gradient calibration
    does not reach them: use the 'params' level for those.  Task parameters: task t's initial
    prediction conv, the distillation messages into t and t's final head.  `forward(images, [t])`
    computes every task's initial features (t's distillation reads them), then t's distillation,
    deep supervision and head only.

    Options:
        head_channels: width of the task features, the distillation and the heads (the release's
            256; the bottlenecks' inner width is a quarter of it, so a multiple of 4).
        neck_channels: output width of the fuse convolution (None: the release's, the summed
            backbone widths, 270 for HRNet-W18).
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        head_channels: int = 256,
        neck_channels: int | None = None,
    ):
        super().__init__(tasks)
        if head_channels < 4 or head_channels % 4:
            raise ValueError(f"padnet head_channels must be a positive multiple of 4, got {head_channels}")
        self.backbone = make_backbone()
        strides, channels = list(self.backbone.strides), list(self.backbone.channels)
        check_strides(strides, "padnet")
        self.size_divisor = max(strides)
        self.task_names = list(tasks)
        self.fuse = FuseLevels(channels, neck_channels)
        fused = self.fuse.out_channels
        self.initial = nn.ModuleDict({t: bottlenecks(fused, head_channels) for t in tasks})
        self.initial_heads = nn.ModuleDict({t: nn.Conv2d(head_channels, s.out_channels, 1) for t, s in tasks.items()})
        self.distillation = MultiModalDistillation(self.task_names, head_channels)
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(*bottlenecks(head_channels, head_channels), nn.Conv2d(head_channels, s.out_channels, 1)) for t, s in tasks.items()}
        )

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.size_divisor)
        psize = tuple(padded.shape[-2:])
        levels = graph_boundary(self.backbone(padded))
        (fused,) = graph_boundary([self.fuse(levels)])
        feats = {t: block(fused) for t, block in self.initial.items()}
        distilled = self.distillation(feats, tasks)
        out = {t: crop_to(self.heads[t](distilled[t]), psize, size) for t in tasks}
        deep = {t: [crop_to(self.initial_heads[t](feats[t]), psize, size)] for t in tasks} if self.training else {}
        return model_output(out, deep_supervision=deep, shared=[fused], branches=levels)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.initial_heads[task].parameters()
        yield from self.distillation.target_parameters(task)
        yield from self.heads[task].parameters()
