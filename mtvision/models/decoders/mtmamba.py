"""Cross-task state-space decoder: MTMamba (Lin et al., ECCV 2024) and MTMamba++ (Lin et al., TPAMI 2025).

By default the layers, constants and initialisations are those of the authors' release
(EnVision-Research/MTMamba, `models/MTMamba.py` and `models/MTMamba_plus.py`).  The decoder climbs
from the coarsest backbone level to finer ones.  Each stage, per task: patch expand (linear without
bias, pixel shuffle, LayerNorm), concatenation with the backbone level of that scale and a linear
reduction with bias (ECR); `stm_depth` self-task Mamba blocks (STM: x + SS2D(LN(x)), no MLP); then
one cross-task block over the tasks:

* "mtmamba" (F-CTM): one LayerNorm over the concatenated task features (T x C channels), a linear
  map to 2C, depthwise conv + SiLU, the four-direction scan and a LayerNorm (the shared map); per
  task its own LayerNorm, an SS2D without gate or out-projection, a sigmoid gate (linear C -> 2C)
  that mixes shared and own maps, an out-projection 2C -> C and the residual.
* "mtmamba++" (S-CTM): one LayerNorm over the concatenated task features, a 1x1 convolution with
  bias to C channels and a 3x3 convolution with bias (the shared map); per task x + CSS2D(LN(x),
  shared), a cross SS2D that scans the task's own feature with Δ, B and C projected from the shared
  map.

Heads: MTMamba expands the last map x4 (linear C -> 16C without bias, pixel shuffle, LayerNorm)
and projects it with a 1x1 convolution with bias; MTMamba++ uses a 3x3 convolution with bias
(truncated-normal 0.02 initialisation), batch norm, ReLU and a 1x1 convolution, whose output the
model resizes bilinearly to the input.  Stochastic depth decays linearly from 0.2 at the first
block of the first stage to 0 at the last cross-task block (9 values for 3 stages).  Neither
release has deep supervision (`deep_supervision=False`, the default, builds no auxiliary heads).

Where the releases are not defined, mtvision chooses (documented, no effect on the full model):
* task order: the concatenations over tasks follow the model's task order (a converted release
  lists its tasks in the release's order), whatever order `forward` is asked for;
* task subsets: the joint LayerNorm runs over the selected tasks' channels (their slices of its
  affine parameters) and the linear map over the concatenation uses their columns, scaled by
  T / (number selected); with one task selected the cross-task block is skipped (a single-task
  model has none);
* saliency: the releases' saliency head has two outputs (softmax over background/foreground); the
  head keeps both (`two_class_saliency`) and the model returns their difference l1 - l0, the logit
  whose sigmoid is the release's foreground probability, as mtvision's saliency task expects;
* inputs whose size is not a multiple of the coarsest used stride are zero-padded (bottom/right)
  and the outputs cropped (the releases are run at 448x576 / 512x512 only).
Release details that the papers do not spell out, followed here: the cross-task blocks normalise
the concatenation of all tasks with one LayerNorm (statistics over T x C channels, not per task);
the S-CTM's 1x1 convolution has a bias; the MTMamba head is exactly patch expand x4, LayerNorm and a
1x1 convolution (no norm or activation after it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from mtvision.errors import MTVisionError
from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.heads import make_norm, resize_to
from mtvision.models.ssm.ss2d import SS2D
from mtvision.tasks import Task

VARIANTS = ("mtmamba", "mtmamba++")
SALIENCY = "saliency"


class SSMDecoderError(MTVisionError, ValueError):
    """The cross-task SSM decoder cannot be built as asked (backbone levels, options)."""


class PatchExpand(nn.Module):
    """x`scale` upsampling of a channels-last map: linear (no bias) to scale² x out channels, pixel
    shuffle with the channel vector laid out (row offset, column offset, channel), LayerNorm."""

    def __init__(self, in_channels: int, out_channels: int, scale: int):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_channels, scale * scale * out_channels, bias=False)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(b, h, w, s, s, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, -1)
        return self.norm(x)


class Mlp(nn.Sequential):
    """Linear, GELU, linear (the optional FFN of an STM block; the releases have none)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))


class STMBlock(nn.Module):
    """Self-task Mamba block: x + SS2D(LN(x)), plus x + MLP(LN(x)) when mlp_ratio > 0."""

    def __init__(self, channels: int, ssm: dict, drop_path: float = 0.0, mlp_ratio: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.op = SS2D(channels, **ssm)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(channels)
            self.mlp = Mlp(channels, int(channels * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def joint_layer_norm(parts: Sequence[Tensor], norm: nn.LayerNorm, index: Sequence[int], total: int) -> Tensor:
    """LayerNorm over the concatenation of `parts` (the tasks `index` of `total`, in model order);
    with every task it is `norm` itself, otherwise the slices of its affine parameters are used."""
    x = torch.cat(list(parts), dim=-1)
    if len(index) == total:
        return norm(x)
    width = norm.normalized_shape[0] // total
    weight = norm.weight.view(total, width)[list(index)].flatten()
    bias = norm.bias.view(total, width)[list(index)].flatten()
    return F.layer_norm(x, (len(index) * width,), weight, bias, norm.eps)


def joint_linear(x: Tensor, weight: Tensor, bias: Tensor | None, index: Sequence[int], total: int) -> Tensor:
    """A linear map of the concatenated features of tasks `index` of `total`: `weight`'s columns of
    those tasks, scaled by total / len(index) (all tasks: the plain linear map)."""
    if len(index) == total:
        return F.linear(x, weight, bias)
    out, width = weight.shape[0], weight.shape[1] // total
    selected = weight.view(out, total, width)[:, list(index)].flatten(1) * (total / len(index))
    return F.linear(x, selected, bias)


class _CrossTaskBlock(nn.Module):
    """Common part of both cross-task blocks: the joint LayerNorm over the model's tasks."""

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        self.tasks = list(tasks)
        self.shared_norm = nn.LayerNorm(len(self.tasks) * channels)

    def _joint(self, feats: dict[str, Tensor]) -> tuple[Tensor, list[int]]:
        """The normalised concatenation of the given tasks (in model order) and their indices."""
        index = [i for i, t in enumerate(self.tasks) if t in feats]
        parts = [feats[self.tasks[i]] for i in index]
        return joint_layer_norm(parts, self.shared_norm, index, len(self.tasks)), index

    def exclusive(self, task: str) -> list[nn.Module]:
        raise NotImplementedError


class FeatureCTM(_CrossTaskBlock):
    """MTMamba's cross-task Mamba block (F-CTM), channels-last.

    shared = LN(scan(SiLU(DWConv(Linear(LN_joint(cat_t x_t)))))); own_t = SS2D(LN_t(x_t)) without
    gate or out-projection; g_t = sigmoid(Linear_t(LN_t(x_t)));
    out_t = x_t + OutProj_t(g_t * shared + (1 - g_t) * own_t).
    """

    def __init__(self, tasks: Sequence[str], channels: int, ssm: dict, drop_path: float = 0.0):
        super().__init__(tasks, channels)
        self.shared = SS2D(channels, **ssm, in_channels=len(self.tasks) * channels, gated=False)
        d_inner = self.shared.d_inner
        self.norm = nn.ModuleDict({t: nn.LayerNorm(channels) for t in self.tasks})
        self.op = nn.ModuleDict({t: SS2D(channels, **ssm, gated=False) for t in self.tasks})
        self.gate = nn.ModuleDict({t: nn.Linear(channels, d_inner, bias=False) for t in self.tasks})
        self.out_proj = nn.ModuleDict({t: nn.Linear(d_inner, channels, bias=False) for t in self.tasks})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        x, index = self._joint(feats)
        projected = joint_linear(x, self.shared.in_proj.weight, None, index, len(self.tasks))
        shared = self.shared.forward_projected(projected)
        out = {}
        for t, x_t in feats.items():
            z = self.norm[t](x_t)
            g = torch.sigmoid(self.gate[t](z))
            mixed = g * shared + (1 - g) * self.op[t](z)
            out[t] = x_t + self.drop_path(self.out_proj[t](mixed))
        return out

    def exclusive(self, task: str) -> list[nn.Module]:
        return [self.norm[task], self.op[task], self.gate[task], self.out_proj[task]]


class SemanticCTM(_CrossTaskBlock):
    """MTMamba++'s semantic-aware cross-task block (S-CTM), channels-last.

    shared = Conv3x3(Conv1x1(LN_joint(cat_t x_t))) (both with bias, nothing between them);
    out_t = x_t + CSS2D_t(LN_t(x_t), shared), a cross SS2D scanning the task feature with Δ, B, C
    projected from the shared map.
    """

    def __init__(self, tasks: Sequence[str], channels: int, ssm: dict, drop_path: float = 0.0):
        super().__init__(tasks, channels)
        self.share_proj = nn.Linear(len(self.tasks) * channels, channels)  # the 1x1 convolution
        self.share_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.ModuleDict({t: nn.LayerNorm(channels) for t in self.tasks})
        self.op = nn.ModuleDict({t: SS2D(channels, **ssm, cross=True) for t in self.tasks})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        x, index = self._joint(feats)
        shared = joint_linear(x, self.share_proj.weight, self.share_proj.bias, index, len(self.tasks))
        shared = self.share_conv(shared.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return {t: x_t + self.drop_path(self.op[t](self.norm[t](x_t), shared)) for t, x_t in feats.items()}

    def exclusive(self, task: str) -> list[nn.Module]:
        return [self.norm[task], self.op[task]]


class ExpandHead(nn.Module):
    """MTMamba's head: x`scale` patch expand at the same width, then a 1x1 convolution with bias
    (channels-last in, NCHW out)."""

    def __init__(self, channels: int, out_channels: int, scale: int = 4):
        super().__init__()
        self.expand = PatchExpand(channels, channels, scale)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.expand(x).permute(0, 3, 1, 2))


class ConvHead(nn.Module):
    """MTMamba++'s head: 3x3 convolution with bias (truncated-normal 0.02), norm, ReLU, then a 1x1
    convolution with bias (channels-last in, NCHW out at the same resolution)."""

    def __init__(self, channels: int, out_channels: int, hidden_channels: int = 96, norm: str = "bn"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 3, padding=1),
            make_norm(norm, hidden_channels),
            nn.ReLU(inplace=True),
        )
        trunc_normal_(self.body[0].weight, std=0.02)
        self.out = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x.permute(0, 3, 1, 2)))


def _power_of_two_ratio(fine: int, coarse: int) -> int | None:
    if coarse % fine:
        return None
    ratio = coarse // fine
    return ratio if ratio & (ratio - 1) == 0 else None


class CrossTaskSSMDecoder(MultiTaskDecoder):
    """MTMamba / MTMamba++ decoder on any backbone whose consecutive used levels differ by a
    power-of-two stride ratio (x1 for plain ViTs, x2 for CNNs and Swin).

    The releases' backbone is mmseg's Swin-L: `backbone.swin_impl: mmseg` with
    `output_norm: all` (eps 1e-5) on timm's `swin_large_patch4_window12_384`.

    Shared representation: the backbone feature maps the decoder reads (the exact tensors).
    `forward(images, tasks)`: only the listed tasks' branches run, and the cross-task blocks mix
    those tasks only (see the module docstring); a subset's outputs therefore differ from the same
    tasks' outputs of a full forward.

    Options:
        variant: "mtmamba" (F-CTM, x4 patch-expand heads) or "mtmamba++" (S-CTM, conv heads).
        channels: decoder width per stage (int for all stages, a list coarse to fine, or None: the
            backbone channels of each stage's skip level, as in the papers).
        d_state: SSM state size (16). expand: SS2D expansion (2). d_conv: depthwise kernel (3).
        dt_rank: Δ projection rank (None: ceil(width / 16)).
        stages: number of decoder stages (None: one per backbone level after the coarsest; fewer
            stages stop at a coarser output stride).
        stm_depth: STM blocks per task and stage (2). mlp_ratio: FFN ratio in STM blocks (0: none).
        drop_path: stochastic depth, decaying linearly from this value at the first block to 0 (0.2).
        head_channels: hidden channels of the MTMamba++ heads (96).
        norm: normalisation of the MTMamba++ heads, "bn" (the release: SyncBN across GPUs, see
            train.sync_bn) or "gn".
        two_class_saliency: the saliency head has the releases' two outputs and the model returns
            their difference (True) or it has one output (False).
        deep_supervision: build per-task 1x1 predictions of the earlier stages and return them as
            deep supervision during training (the releases have none).
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        variant: str = "mtmamba",
        channels: int | list[int] | None = None,
        d_state: int = 16,
        expand: float = 2.0,
        d_conv: int = 3,
        dt_rank: int | None = None,
        stages: int | None = None,
        stm_depth: int = 2,
        mlp_ratio: float = 0.0,
        drop_path: float = 0.2,
        head_channels: int = 96,
        norm: str = "bn",
        two_class_saliency: bool = True,
        deep_supervision: bool = False,
    ):
        super().__init__(tasks)
        if variant not in VARIANTS:
            raise SSMDecoderError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
        self.variant = variant
        self.backbone = make_backbone()
        in_channels, strides = list(self.backbone.channels), list(self.backbone.strides)
        if len(strides) < 2:
            raise SSMDecoderError(
                f"the cross-task SSM decoder needs at least two backbone levels, got strides {strides}"
            )
        stages = len(strides) - 1 if stages is None else int(stages)
        if not 1 <= stages <= len(strides) - 1:
            raise SSMDecoderError(f"stages must be between 1 and {len(strides) - 1} for backbone strides {strides}")
        self.levels = list(range(len(strides) - stages - 1, len(strides)))  # used levels, fine to coarse
        used = [strides[i] for i in self.levels]
        scales = []
        for fine, coarse in zip(used[:-1], used[1:]):
            ratio = _power_of_two_ratio(fine, coarse)
            if ratio is None:
                raise SSMDecoderError(
                    f"backbone strides {strides}: consecutive levels must differ by a power-of-two ratio "
                    f"(x1, x2, x4, ...), but {fine} -> {coarse} does not"
                )
            scales.append(ratio)
        skip_levels = self.levels[:-1][::-1]  # coarse to fine, one per stage
        if channels is None:
            widths = [in_channels[i] for i in skip_levels]
        elif isinstance(channels, int):
            widths = [channels] * stages
        else:
            widths = [int(c) for c in channels]
            if len(widths) != stages:
                raise SSMDecoderError(f"channels lists {len(widths)} widths for {stages} stages")
        self.stride = used[-1]  # inputs are padded to a multiple of the coarsest used stride
        self.output_stride = used[0]
        self.deep_supervision = deep_supervision
        ssm = dict(d_state=d_state, expand=expand, d_conv=d_conv, dt_rank=dt_rank)
        rates = torch.linspace(drop_path, 0, stages * (stm_depth + 1), device="cpu").tolist()
        cross_block = SemanticCTM if variant == "mtmamba++" else FeatureCTM

        names = list(tasks)
        self.expand = nn.ModuleDict({t: nn.ModuleList() for t in names})
        self.reduce = nn.ModuleDict({t: nn.ModuleList() for t in names})
        self.stm = nn.ModuleDict({t: nn.ModuleList() for t in names})
        self.cross = nn.ModuleList()
        prev = in_channels[self.levels[-1]]
        for i, (width, skip) in enumerate(zip(widths, skip_levels)):
            scale = scales[len(scales) - 1 - i]
            r = rates[i * (stm_depth + 1) : (i + 1) * (stm_depth + 1)]
            for t in names:
                self.expand[t].append(PatchExpand(prev, width, scale))
                self.reduce[t].append(nn.Linear(width + in_channels[skip], width))
                blocks = [STMBlock(width, ssm, r[j], mlp_ratio) for j in range(stm_depth)]
                self.stm[t].append(nn.Sequential(*blocks))
            self.cross.append(cross_block(names, width, ssm, r[-1]) if len(names) > 1 else nn.Identity())
            prev = width
        self.two_class = {t for t in names if t == SALIENCY and two_class_saliency}
        head_out = {n: 2 if n in self.two_class else t.out_channels for n, t in tasks.items()}
        if variant == "mtmamba":
            heads = {n: ExpandHead(prev, head_out[n]) for n in names}
        else:
            heads = {n: ConvHead(prev, head_out[n], head_channels, norm=norm) for n in names}
        self.heads = nn.ModuleDict(heads)
        self.aux_heads = None
        if deep_supervision:
            self.aux_heads = nn.ModuleDict(
                {n: nn.ModuleList(nn.Linear(w, t.out_channels) for w in widths[:-1]) for n, t in tasks.items()}
            )

    # ------------------------------------------------------------------ forward
    def _predict(self, task: str, x: Tensor) -> Tensor:
        out = self.heads[task](x)
        if task in self.two_class:  # softmax over (background, foreground) -> the foreground logit
            out = out[:, 1:2] - out[:, 0:1]
        return out

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        feats = self.backbone(images)
        used = graph_boundary([feats[i] for i in self.levels])
        maps = [f.permute(0, 2, 3, 1) for f in used]  # channels-last
        x = {t: maps[-1] for t in tasks}
        supervise = self.training and self.aux_heads is not None
        aux: dict[str, list[Tensor]] = {t: [] for t in tasks}
        stages = len(self.cross)
        for i in range(stages):
            skip = maps[-2 - i]
            for t in tasks:
                up = self.expand[t][i](x[t])
                if up.shape[1:3] != skip.shape[1:3]:  # backbones that round sizes differently
                    up = resize_to(up.permute(0, 3, 1, 2), skip.shape[1:3]).permute(0, 2, 3, 1)
                x[t] = self.stm[t][i](self.reduce[t][i](torch.cat([up, skip], dim=-1)))
            if len(tasks) > 1:
                x = self.cross[i](x)
            if supervise and i < stages - 1:
                for t in tasks:
                    aux[t].append(self.aux_heads[t][i](x[t]).permute(0, 3, 1, 2))
        out = {t: self._predict(t, x[t]) for t in tasks}
        deep = aux if supervise and stages > 1 else {}
        if pad_h or pad_w:
            padded = images.shape[-2:]
            crop = lambda y: resize_to(y, padded)[..., :height, :width]  # noqa: E731
            out = {t: crop(o) for t, o in out.items()}
            deep = {t: [crop(p) for p in v] for t, v in deep.items()}
        return model_output(out, deep_supervision=deep, shared=used)

    # ------------------------------------------------------------------ contract

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Head (and aux heads) of `task`, plus everything after the last cross-task block that only
        `task` uses (a single-task model: the whole decoder branch)."""
        modules: list[nn.Module] = [self.heads[task]]
        if self.aux_heads is not None:
            modules.append(self.aux_heads[task])
        if len(self.tasks) == 1:
            modules += [self.expand[task], self.reduce[task], self.stm[task]]
        else:
            modules += self.cross[-1].exclusive(task)
        seen: set[int] = set()
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p
