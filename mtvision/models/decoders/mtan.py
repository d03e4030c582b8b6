"""MTAN (Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019): one shared
network, and per task a soft-attention column that picks features from it at every block.

An attention module is a 1x1 conv-BN-ReLU, then a 1x1 conv-BN-sigmoid: a mask in (0, 1) that
multiplies a shared feature map element-wise.  Its input is a shared map concatenated with the
task's attended features of the previous block, passed through a block shared by all tasks.

Two forms, chosen by the backbone:

- `backbone: segnet` (the NYUv2-13 optimiser benchmark, `mtvision/models/segnet.py`): attention
  at every encoder and every decoder stage.  Encoder stage l: the mask reads the stage's first
  conv output (with the previous attended map, l > 0) and multiplies its last conv output; a
  shared 3x3 conv-BN-ReLU to the next stage's width and a 2x2 max-pool carry the result on.
  Decoder stage l (coarse to fine): the previous attended map is upsampled x2 (bilinear, corners
  aligned) and passed through a shared 3x3 conv-BN-ReLU; the mask reads it with the stage's
  unpooled input and multiplies the stage's output.  Each task's head is a 3x3 convolution and a
  1x1 convolution (both with a bias, no normalisation) on its finest attended map.  Everything is
  initialised as the SegNet is.  With 13 classes, depth and normals this is the benchmark's
  44,229,073-parameter network (its task-uncertainty parameters live in the loss weighting here).
- any timm CNN: attention over each returned stage; the mask reads the stage's output with the
  previous attended map and multiplies the same output (timm exposes stage outputs only, where
  MTAN's ResNet form reads the input of each stage's last block); masks have a quarter of the
  stage's width inside, as MTAN's ResNet form; the shared block between stages is a residual
  bottleneck to the next stage's width, then a max-pool to its size.  Each task has its own FPN
  neck over its attended levels and a head.

The outputs are raw: logits (the release's log-softmax is part of the cross-entropy), depth, and
unnormalised normals (the normals loss and decoding normalise them, as the release's output
layer does).  `shared` holds the shared network's maps that the attention reads; there are no
branch points (FULLER's level does not apply).  `forward(images, [t])` runs the shared network and
task t's attention column only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck
from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.models.segnet import SegNet, conv_bn_relu, init_segnet_weights
from mtvision.tasks import Task


class AttentionMask(nn.Sequential):
    """1x1 conv-BN-ReLU to `hidden` channels, 1x1 conv-BN-sigmoid to `out_channels`: a soft mask."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )


class SegNetTaskHead(nn.Sequential):
    """The benchmark's prediction layer: a 3x3 convolution, then a 1x1 convolution to the task's channels."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, out_channels, 1))


class _SegNetColumn(nn.Module):
    """One task's attention modules over the SegNet: an encoder and a decoder mask per stage."""

    def __init__(self, widths: Sequence[int], decoder_widths: Sequence[int]):
        super().__init__()
        w, d = list(widths), list(decoder_widths)
        self.encoder = nn.ModuleList(
            AttentionMask(w[0] if i == 0 else 2 * w[i], w[i], w[i]) for i in range(5)
        )
        self.decoder = nn.ModuleList(AttentionMask(w[i] + d[i], d[i], d[i]) for i in range(5))


class MTANDecoder(MultiTaskDecoder):
    """MTAN over a SegNet (the benchmark form) or over any timm CNN's stages (see the module docstring).

    Options (timm form only; the SegNet form has the benchmark's fixed layers):
        neck_channels: channels of each task's FPN neck (default 128).
        head_channels: hidden channels of each task head (default 64).
        norm: "bn" or "gn" in the necks and heads (default "bn").
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        neck_channels: int | None = None,
        head_channels: int | None = None,
        norm: str | None = None,
    ):
        super().__init__(tasks)
        self.backbone = make_backbone()
        self.segnet_form = isinstance(self.backbone, SegNet)
        if self.segnet_form:
            given = [k for k, v in {"neck_channels": neck_channels, "head_channels": head_channels, "norm": norm}.items()
                     if v is not None]
            if given:
                raise ValueError(f"MTAN over a SegNet has the benchmark's fixed layers; drop decoder_options {given}")
            self._build_segnet_form(tasks)
        else:
            self._build_timm_form(tasks, neck_channels or 128, head_channels or 64, norm or "bn")

    # ------------------------------------------------------------------ SegNet form
    def _build_segnet_form(self, tasks: dict[str, Task]) -> None:
        net: SegNet = self.backbone
        w, d = net.widths, net.decoder_widths
        # shared between tasks: encoder stage i -> the next stage's width (the last keeps its own)
        self.encoder_shared = nn.ModuleList(conv_bn_relu(w[i], w[min(i + 1, 4)]) for i in range(5))
        # decoder stage i reads the coarser attended map: the encoder's last one (i = 4) or stage i + 1's
        coarser = [d[1], d[2], d[3], d[4], w[4]]
        self.decoder_shared = nn.ModuleList(conv_bn_relu(coarser[i], d[i]) for i in range(5))
        self.columns = nn.ModuleDict({n: _SegNetColumn(w, d) for n in tasks})
        self.heads = nn.ModuleDict({n: SegNetTaskHead(d[0], t.out_channels) for n, t in tasks.items()})
        for part in (self.encoder_shared, self.decoder_shared, self.columns, self.heads):
            init_segnet_weights(part)
        self.output_stride = 1

    def _segnet_forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        maps = self.backbone.maps(images)
        flat = graph_boundary([*maps.enc_first, *maps.enc_last, *maps.dec_in, *maps.dec_out])
        enc_first, enc_last, dec_in, dec_out = (flat[k * 5 : (k + 1) * 5] for k in range(4))
        predictions = {}
        for t in tasks:
            column = self.columns[t]
            prev: Tensor | None = None
            for i in range(5):
                source = enc_first[i] if prev is None else torch.cat([enc_first[i], prev], dim=1)
                attended = column.encoder[i](source) * enc_last[i]
                prev = F.max_pool2d(self.encoder_shared[i](attended), 2, 2)
            for i in range(4, -1, -1):
                up = F.interpolate(prev, size=dec_in[i].shape[-2:], mode="bilinear", align_corners=True)
                up = self.decoder_shared[i](up)
                prev = column.decoder[i](torch.cat([dec_in[i], up], dim=1)) * dec_out[i]
            predictions[t] = self.heads[t](prev)
        return model_output(predictions, shared=flat)

    # ------------------------------------------------------------------ timm form
    def _build_timm_form(self, tasks: dict[str, Task], neck_channels: int, head_channels: int, norm: str) -> None:
        c = list(self.backbone.channels)
        carried = [_bottleneck_out(c[i + 1]) for i in range(len(c) - 1)]
        self.stage_shared = nn.ModuleList(_bottleneck(c[i], c[i + 1]) for i in range(len(c) - 1))
        self.columns = nn.ModuleDict({
            n: nn.ModuleList(
                AttentionMask(c[i] + (carried[i - 1] if i else 0), max(1, c[i] // 4), c[i]) for i in range(len(c))
            )
            for n in tasks
        })
        self.necks = nn.ModuleDict(
            {n: MultiScaleNeck(c, self.backbone.strides, neck_channels, norm=norm) for n in tasks}
        )
        self.heads = nn.ModuleDict(
            {n: TaskHead(neck_channels, t.out_channels, head_channels, norm=norm) for n, t in tasks.items()}
        )
        self.output_stride = min(self.backbone.strides)

    def _timm_forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        features = graph_boundary(self.backbone(images))
        predictions = {}
        for t in tasks:
            attended: list[Tensor] = []
            prev: Tensor | None = None
            for i, (mask, u) in enumerate(zip(self.columns[t], features)):
                source = u if prev is None else torch.cat([u, prev], dim=1)
                attended.append(mask(source) * u)
                if i + 1 < len(features):
                    prev = F.adaptive_max_pool2d(self.stage_shared[i](attended[-1]), features[i + 1].shape[-2:])
            predictions[t] = self.heads[t](self.necks[t](attended))
        return model_output(predictions, shared=features)

    # ------------------------------------------------------------------ contract
    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        if self.segnet_form:
            return self._segnet_forward(images, tasks)
        return self._timm_forward(images, tasks)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.columns[task].parameters()
        if not self.segnet_form:
            yield from self.necks[task].parameters()
        yield from self.heads[task].parameters()


def _bottleneck_out(channels: int) -> int:
    return 4 * max(1, channels // 4)


def _bottleneck(in_channels: int, out_channels: int) -> nn.Module:
    """A ResNet bottleneck from `in_channels` to 4 * (out_channels // 4), with a projection shortcut."""
    planes = max(1, out_channels // 4)
    shortcut = nn.Sequential(nn.Conv2d(in_channels, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes))
    return Bottleneck(in_channels, planes, downsample=shortcut)
