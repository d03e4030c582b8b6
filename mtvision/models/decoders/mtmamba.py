"""Cross-task state-space decoder: MTMamba (Lin et al., ECCV 2024) and MTMamba++ (Lin et al. 2024).

The decoder climbs from the coarsest backbone level to finer ones.  Each stage, per task: patch
expand (linear + pixel shuffle, LayerNorm), concatenate the backbone skip of that scale and reduce
(ECR); `stm_depth` self-task Mamba blocks (STM: x + SS2D(LN(x))); then one cross-task block over
the tasks being computed:
  * "mtmamba" (F-CTM): a shared SS2D over all task features and one SS2D per task, mixed per task by
    a learned sigmoid gate on the task feature, then a per-task out-projection and residual;
  * "mtmamba++" (S-CTM): a shared map from all task features (1x1 projections, 3x3 conv); each
    task's own feature is the scanned input u of a cross SSM whose Δ, B and C come from the shared
    map, with a residual.
A per-task head (conv-norm-ReLU + 1x1, as MTMamba++) predicts from the last stage.  In training mode,
per-task 1x1 predictions from every earlier stage come back as the output's deep supervision.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from mtvision.errors import MTVisionError
from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.heads import TaskHead, resize_to
from mtvision.models.ssm.ss2d import SS2D
from mtvision.tasks import Task

VARIANTS = ("mtmamba", "mtmamba++")


class SSMDecoderError(MTVisionError, ValueError):
    """The cross-task SSM decoder cannot be built as asked (backbone levels, options)."""


class PatchExpand(nn.Module):
    """x`scale` upsampling of a channels-last map: linear to scale² x out channels, pixel shuffle, LayerNorm."""

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
    """Linear, GELU, linear (the optional FFN of an STM block)."""

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


class _CrossTaskBlock(nn.Module):
    """Shared aggregation of the selected tasks' features: mean_t of Linear_t(LN_t(x_t)).

    This equals a linear map of the (per-task normalised) concatenation, as in the papers, and stays
    defined for any subset of the tasks.  `exclusive(t)` lists the modules that only task t uses.
    """

    def __init__(self, tasks: Sequence[str], channels: int, shared_channels: int):
        super().__init__()
        self.share_norm = nn.ModuleDict({t: nn.LayerNorm(channels) for t in tasks})
        self.share_proj = nn.ModuleDict({t: nn.Linear(channels, shared_channels, bias=False) for t in tasks})

    def aggregate(self, feats: dict[str, Tensor]) -> Tensor:
        parts = [self.share_proj[t](self.share_norm[t](x)) for t, x in feats.items()]
        return torch.stack(parts).mean(0)

    def exclusive(self, task: str) -> list[nn.Module]:
        raise NotImplementedError


class FeatureCTM(_CrossTaskBlock):
    """MTMamba's cross-task Mamba block (F-CTM), channels-last.

    shared = LN(SS2D-scan(SiLU(DWConv(aggregate))))); own_t = SS2D(LN(x_t)) without gate;
    g_t = sigmoid(Linear(LN(x_t))); out_t = x_t + OutProj_t(g_t * shared + (1 - g_t) * own_t).
    """

    def __init__(self, tasks: Sequence[str], channels: int, ssm: dict, drop_path: float = 0.0):
        shared = SS2D(channels, **ssm, gated=False)
        super().__init__(tasks, channels, shared.d_inner)
        shared.in_proj = nn.Identity()  # the aggregation is the shared in-projection
        self.shared = shared
        d_inner = shared.d_inner
        self.norm = nn.ModuleDict({t: nn.LayerNorm(channels) for t in tasks})
        self.op = nn.ModuleDict({t: SS2D(channels, **ssm, gated=False) for t in tasks})
        self.gate = nn.ModuleDict({t: nn.Linear(channels, d_inner, bias=False) for t in tasks})
        self.out_proj = nn.ModuleDict({t: nn.Linear(d_inner, channels, bias=False) for t in tasks})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        shared = self.shared(self.aggregate(feats))
        out = {}
        for t, x in feats.items():
            z = self.norm[t](x)
            g = torch.sigmoid(self.gate[t](z))
            mixed = g * shared + (1 - g) * self.op[t](z)
            out[t] = x + self.drop_path(self.out_proj[t](mixed))
        return out

    def exclusive(self, task: str) -> list[nn.Module]:
        return [self.norm[task], self.op[task], self.gate[task], self.out_proj[task]]


class SemanticCTM(_CrossTaskBlock):
    """MTMamba++'s semantic-aware cross-task block (S-CTM), channels-last.

    shared = Conv3x3(aggregate); out_t = x_t + CSS2D_t(LN(x_t), shared), where the cross SS2D scans
    the task feature with Δ, B, C projected from the shared map.
    """

    def __init__(self, tasks: Sequence[str], channels: int, ssm: dict, drop_path: float = 0.0):
        super().__init__(tasks, channels, channels)
        self.share_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.ModuleDict({t: nn.LayerNorm(channels) for t in tasks})
        self.op = nn.ModuleDict({t: SS2D(channels, **ssm, cross=True) for t in tasks})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        shared = self.share_conv(self.aggregate(feats).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return {t: x + self.drop_path(self.op[t](self.norm[t](x), shared)) for t, x in feats.items()}

    def exclusive(self, task: str) -> list[nn.Module]:
        return [self.norm[task], self.op[task]]


def _power_of_two_ratio(fine: int, coarse: int) -> int | None:
    if coarse % fine:
        return None
    ratio = coarse // fine
    return ratio if ratio & (ratio - 1) == 0 else None


class CrossTaskSSMDecoder(MultiTaskDecoder):
    """MTMamba / MTMamba++ decoder on any backbone whose consecutive used levels differ by a
    power-of-two stride ratio (x1 for plain ViTs, x2 for CNNs and Swin).

    Shared representation: the backbone feature maps the decoder reads (the exact tensors).
    `forward(images, tasks)`: only the listed tasks' branches run, and the cross-task blocks mix
    those tasks only (with one task they are skipped, which is the single-task path); a subset's
    outputs therefore differ from the same tasks' outputs of a full forward.  Inputs whose size is not
    a multiple of the coarsest used stride are zero-padded (bottom/right) and the outputs cropped.

    Options:
        variant: "mtmamba" (F-CTM cross-task block) or "mtmamba++" (S-CTM, cross SSM).
        channels: decoder width per stage (int for all stages, a list coarse to fine, or None: the
            backbone channels of each stage's skip level, as in the papers).
        d_state: SSM state size (16). expand: SS2D expansion (2). d_conv: depthwise kernel (3).
        dt_rank: Δ projection rank (None: ceil(width / 16)).
        stages: number of decoder stages (None: one per backbone level after the coarsest; fewer
            stages stop at a coarser output stride).
        stm_depth: STM blocks per task and stage (2). mlp_ratio: FFN ratio in STM blocks (0: none).
        drop_path: stochastic depth, decaying linearly from this value at the first block to 0 (0.2).
        head_channels: hidden channels of the final task heads (96, as MTMamba++).
        norm: normalisation of the task heads, "bn" or "gn".
        deep_supervision: return per-task predictions of the earlier stages as deep supervision
            during training (the papers' NYUD/PASCAL recipes train without it).
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        variant: str = "mtmamba++",
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
        deep_supervision: bool = True,
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
        rates = torch.linspace(drop_path, 0, stages * (stm_depth + 1)).tolist()
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
        self.heads = nn.ModuleDict(
            {n: TaskHead(prev, t.out_channels, head_channels, norm=norm) for n, t in tasks.items()}
        )
        self.aux_heads = nn.ModuleDict(
            {n: nn.ModuleList(nn.Linear(w, t.out_channels) for w in widths[:-1]) for n, t in tasks.items()}
        )

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        feats = self.backbone(images)
        used = graph_boundary([feats[i] for i in self.levels])
        maps = [f.permute(0, 2, 3, 1) for f in used]  # channels-last
        x = {t: maps[-1] for t in tasks}
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
            if self.training and self.deep_supervision and i < stages - 1:
                for t in tasks:
                    aux[t].append(self.aux_heads[t][i](x[t]).permute(0, 3, 1, 2))
        out = {t: self.heads[t](x[t].permute(0, 3, 1, 2)) for t in tasks}
        deep = aux if self.training and self.deep_supervision and stages > 1 else {}
        if pad_h or pad_w:
            padded = images.shape[-2:]
            crop = lambda y: resize_to(y, padded)[..., :height, :width]  # noqa: E731
            out = {t: crop(o) for t, o in out.items()}
            deep = {t: [crop(p) for p in v] for t, v in deep.items()}
        return model_output(out, deep_supervision=deep, shared=used)

    # ------------------------------------------------------------------ contract

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Head and aux heads of `task`, plus everything after the last cross-task block that only
        `task` uses (a single-task model: the whole decoder branch)."""
        modules: list[nn.Module] = [self.heads[task], self.aux_heads[task]]
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
