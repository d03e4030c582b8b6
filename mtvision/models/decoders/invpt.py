"""Cross-task attention decoder: InvPT (Ye & Xu, "Inverted Pyramid Multi-task Transformer for Dense
Scene Understanding", ECCV 2022).

Pipeline (defaults are the paper's / official release's):

1. The coarsest backbone feature is resized to the first decoder stage (stride `input_stride`, 32:
   the release interpolates ViT's 1/16 map down to 1/32).  Per task, a *preliminary decoder* (two
   3x3 conv-BN-ReLU blocks) gives task features F_t, and a 1x1 conv gives a preliminary prediction
   P_t (deep supervision, `deep_supervision[t]` of the output in training mode).  [F_t, P_t] is re-embedded by a
   1x1 conv to the stage-0 token width (task_channels + prediction_channels).
2. `num_stages` UP-Transformer stages; stage k runs at stride input_stride / 2^k with width
   dim_0 / 2^k ("inverted pyramid").  Stage k >= 1 first up-embeds every task's map (bilinear x2,
   two dilated 3x3 conv-BN-ReLU) and adds the backbone skip feature of the matching stride
   (3x3 conv to the stage width, resized to the stage grid).  Single-stride backbones (plain ViTs)
   feed level L-1-k to stage k, as the release does for ViT-L.
3. In each stage one block of joint attention runs over the concatenation of all tasks' tokens
   (T x h x w queries, every task sees every position of every task).  Q is a per-task depth-wise
   3x3 conv (stride `q_stride`) + BN, K/V are per-task depth-wise convs + BN (or average pooling,
   the release's choice) with stride `kv_strides[k]`, followed by shared linear projections.  The
   attention output (at the Q grid) is bilinearly upsampled back to the stage grid; pre-norm
   residual + MLP as in a transformer block.
4. Attention message passing: the (fused) pre-softmax attention scores of stage k-1,
   B x heads x (T*hq'*wq') x (T*hk'*wk'), are resized to stage k's grids (bilinear over each query
   task's hq' x wq' grid, and over each key task's hk' x wk' grid if that changed), concatenated
   with stage k's scores along the head axis and fused by a learned 1x1 conv (2*heads -> heads),
   exactly as the official release does; the fused scores go through the softmax and are passed on.
5. Every stage's task maps are layer-normed, reduced to dim_0 channels, upsampled to twice the last
   stage's resolution (stride 4 by default) and summed; per task a 3x3 conv-BN-ReLU then the head.

Deviations from the release (documented, deliberate): the stage read-out LayerNorm is per task
(the release normalises over all tasks' channels jointly, which mixes tasks after the last
attention); skip features are resized bilinearly after a 3x3 conv instead of the ViT-specific
transposed conv; the attention scale is head_dim^-0.5 (the release uses dim^-0.5).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from mtvision.errors import MTVisionError
from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.heads import ConvBNReLU, make_norm, resize_to
from mtvision.tasks import Task

KV_PROJECTIONS = ("dwconv", "avg")


class DecoderStrideError(MTVisionError, ValueError):
    """The backbone's feature strides do not fit the decoder."""


# ---------------------------------------------------------------------------- shared helpers
def check_strides(strides: Sequence[int], decoder: str, max_stride: int | None = None) -> None:
    """Raise DecoderStrideError unless `strides` are powers of two, fine to coarse, <= max_stride."""
    bad = [s for s in strides if s < 1 or s & (s - 1)]
    if bad:
        raise DecoderStrideError(f"decoder {decoder!r} needs power-of-two feature strides, got {list(strides)}")
    if list(strides) != sorted(strides):
        raise DecoderStrideError(f"decoder {decoder!r}: feature levels must go fine to coarse, got strides {list(strides)}")
    if max_stride is not None and max(strides) > max_stride:
        raise DecoderStrideError(
            f"decoder {decoder!r} starts at stride {max_stride} but the backbone has stride {max(strides)} features; "
            "drop the coarser levels with backbone.out_indices or raise the decoder's input_stride"
        )


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad images at the bottom/right so that height and width are multiples of `multiple`."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(images, (0, pw, 0, ph)) if ph or pw else images


def crop_to(x: Tensor, padded: Sequence[int], size: Sequence[int]) -> Tensor:
    """A map computed on a padded image, brought to the padded size and cropped to `size` (no-op
    when nothing was padded: the model resizes outputs to the input size itself)."""
    if tuple(padded) == tuple(size):
        return x
    return resize_to(x, padded)[..., : size[0], : size[1]]


def _grid(size: Sequence[int], stride: int) -> tuple[int, int]:
    return (size[0] // stride, size[1] // stride)


# ---------------------------------------------------------------------------- attention
class ConvProjection(nn.Module):
    """Depth-wise conv + BN (or average pooling) with a stride: a map -> a smaller map."""

    def __init__(self, channels: int, stride: int, kind: str = "dwconv"):
        super().__init__()
        if kind not in KV_PROJECTIONS:
            raise ValueError(f"unknown projection {kind!r} (valid: {', '.join(KV_PROJECTIONS)})")
        kernel, pad = (3, 1) if stride <= 2 else (stride, 0)
        if kind == "avg":
            self.op: nn.Module = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        else:
            self.op = nn.Sequential(
                nn.Conv2d(channels, channels, kernel, stride, pad, groups=channels, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def resize_scores(scores: Tensor, tasks: int, q_from: tuple[int, int], q_to: tuple[int, int],
                  k_from: tuple[int, int], k_to: tuple[int, int]) -> Tensor:
    """Resize B x H x (T*q_from) x (T*k_from) attention scores to B x H x (T*q_to) x (T*k_to),
    bilinearly over each task's query grid and each task's key grid."""
    b, h = scores.shape[:2]
    if q_from != q_to:
        s = scores.reshape(b * h, tasks, q_from[0], q_from[1], -1).permute(0, 1, 4, 2, 3)
        s = s.reshape(b * h * tasks, -1, *q_from)
        s = F.interpolate(s, size=q_to, mode="bilinear", align_corners=False)
        scores = s.reshape(b * h, tasks, -1, q_to[0] * q_to[1]).transpose(-1, -2).reshape(b, h, -1, scores.shape[-1])
    if k_from != k_to:
        nq = scores.shape[2]
        s = scores.reshape(b * h * nq * tasks, 1, *k_from)
        s = F.interpolate(s, size=k_to, mode="bilinear", align_corners=False)
        scores = s.reshape(b, h, nq, tasks * k_to[0] * k_to[1])
    return scores


class JointTaskAttention(nn.Module):
    """Multi-head attention over the concatenated tokens of all tasks, with per-task strided
    depth-wise conv Q/K/V projections and attention message passing from the previous stage.

    Set `keep_attention = True` to keep the last softmax attention in `self.attention`
    (B x heads x queries x keys) for inspection.
    """

    def __init__(self, task_names: Sequence[str], dim: int, num_heads: int, q_stride: int, kv_stride: int,
                 kv_proj: str = "dwconv", qkv_bias: bool = True, message: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_stride, self.kv_stride = q_stride, kv_stride
        self.conv_q = nn.ModuleDict({t: ConvProjection(dim, q_stride, "dwconv") for t in task_names})
        self.conv_k = nn.ModuleDict({t: ConvProjection(dim, kv_stride, kv_proj) for t in task_names})
        self.conv_v = nn.ModuleDict({t: ConvProjection(dim, kv_stride, kv_proj) for t in task_names})
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fuse_message = nn.Conv2d(2 * num_heads, num_heads, 1) if message else None
        self.keep_attention = False
        self.attention: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, maps: dict[str, Tensor], message: dict | None = None) -> dict[str, Tensor]:
        """Per-task B x C x h x w maps -> per-task attention outputs at the same grid; reads and
        replaces `message['scores', 'q', 'k']` (the previous stage's scores and grids)."""
        names = list(maps)
        size = next(iter(maps.values())).shape[-2:]
        qs = [self.conv_q[t](maps[t]) for t in names]
        ks = [self.conv_k[t](maps[t]) for t in names]
        vs = [self.conv_v[t](maps[t]) for t in names]
        q_grid, k_grid = tuple(qs[0].shape[-2:]), tuple(ks[0].shape[-2:])
        flat = lambda xs: torch.cat([x.flatten(2).transpose(1, 2) for x in xs], 1)  # noqa: E731
        q = self._heads(self.proj_q(flat(qs)))
        k = self._heads(self.proj_k(flat(ks)))
        v = self._heads(self.proj_v(flat(vs)))
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if message is not None and self.fuse_message is not None and message.get("scores") is not None:
            prev = resize_scores(message["scores"], len(names), message["q"], q_grid, message["k"], k_grid)
            scores = self.fuse_message(torch.cat([scores, prev], 1))
        if message is not None:
            message.update(scores=scores, q=q_grid, k=k_grid)
        attn = scores.softmax(-1)
        self.attention = attn.detach() if self.keep_attention else None
        out = self.proj((attn @ v).transpose(1, 2).flatten(2))
        nq = q_grid[0] * q_grid[1]
        result = {}
        for i, t in enumerate(names):
            o = out[:, i * nq : (i + 1) * nq].transpose(1, 2).reshape(out.shape[0], -1, *q_grid)
            result[t] = resize_to(o, size)
        return result


class JointTaskBlock(nn.Module):
    """Pre-norm transformer block: joint task attention + MLP (weights shared by all tasks)."""

    def __init__(self, task_names: Sequence[str], dim: int, num_heads: int, mlp_ratio: float, q_stride: int,
                 kv_stride: int, kv_proj: str, drop_path: float, message: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = JointTaskAttention(task_names, dim, num_heads, q_stride, kv_stride, kv_proj, message=message)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @staticmethod
    def _ln(norm: nn.LayerNorm, x: Tensor) -> Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, maps: dict[str, Tensor], message: dict | None) -> dict[str, Tensor]:
        attended = self.attn({t: self._ln(self.norm1, x) for t, x in maps.items()}, message)
        out = {}
        for t, x in maps.items():
            x = x + self.drop_path(attended[t])
            y = self.mlp(self.norm2(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            out[t] = x + self.drop_path(y)
        return out


class UpEmbed(nn.Sequential):
    """x2 bilinear upsampling, then two dilated 3x3 conv-BN-ReLU (the release's up-embedding)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "bn"):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, 3, padding=2, dilation=2, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=2, dilation=2, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


# ---------------------------------------------------------------------------- decoder
class CrossTaskAttentionDecoder(MultiTaskDecoder):
    """InvPT: per-task preliminary decoders, then an inverted pyramid of joint all-task attention
    stages with attention message passing and backbone skips, then per-task heads (see the module
    docstring for the exact computation).

    Shared representation: the backbone feature maps the decoder consumes (the input level and the
    skip levels).  Every task's loss flows through them, but note that the joint-attention stages
    after them are *shared* parameters that no single tensor separates from the heads: feature-level
    gradient calibration does not reach them, so calibrate this decoder at the 'params' level.
    Task parameters: task t's stage read-outs, final conv and head, and its query projection in the
    last stage (preliminary decoders and aux heads feed the joint attention, so they are shared).
    `forward(images, [t])` must still run every task's tokens through the joint stages (t attends to
    them); it skips the other tasks' read-outs, heads and aux outputs.  Inputs whose size is not a
    multiple of `size_divisor` are zero-padded and the outputs cropped back.

    Options:
        task_channels: width of the preliminary task features (512 for ViT-L in the release).
        prediction_channels: extra token width for re-embedded predictions (64); stage-0 width is
            task_channels + prediction_channels, halved at each stage.
        num_stages: UP-Transformer stages (3); stage k at stride input_stride / 2^k.
        input_stride: stride of the first stage (32).
        num_heads: attention heads per stage (2).
        mlp_ratio: MLP expansion (4).
        q_stride: stride of the depth-wise conv query projection (2).
        kv_strides: key/value projection stride per stage ((2, 4, 8): a constant key count).
        kv_proj: "dwconv" (depth-wise conv + BN) or "avg" (average pooling, the release's choice).
        message_passing: pass fused attention scores from stage to stage (True).
        drop_path: stochastic depth rate in every stage (0.15).
        norm: "bn" or "gn" in the convolutional parts.
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        task_channels: int = 512,
        prediction_channels: int = 64,
        num_stages: int = 3,
        input_stride: int = 32,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        q_stride: int = 2,
        kv_strides: Sequence[int] = (2, 4, 8),
        kv_proj: str = "dwconv",
        message_passing: bool = True,
        drop_path: float = 0.15,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        self.backbone = make_backbone()
        strides, channels = list(self.backbone.strides), list(self.backbone.channels)
        check_strides(strides, "invpt", max_stride=input_stride)
        check_strides([input_stride], "invpt")
        if num_stages < 1 or input_stride >> (num_stages - 1) < 2:
            raise DecoderStrideError(f"invpt: {num_stages} stages from stride {input_stride} go below stride 2")
        if len(kv_strides) != num_stages:
            raise ValueError(f"kv_strides needs one entry per stage ({num_stages}), got {list(kv_strides)}")
        self.task_names = list(tasks)
        self.input_stride, self.num_stages = input_stride, num_stages
        self.stage_strides = [input_stride >> k for k in range(num_stages)]
        self.output_stride = self.stage_strides[-1] // 2
        self.size_divisor = max(max(strides), input_stride)
        dim0 = task_channels + prediction_channels
        self.dims = [dim0 >> k for k in range(num_stages)]
        if min(self.dims) < num_heads:
            raise ValueError(f"stage widths {self.dims} are too narrow for {num_heads} heads")
        self.input_level = len(strides) - 1
        self.skip_levels = [None] + [self._skip_level(strides, s, k) for k, s in enumerate(self.stage_strides) if k]
        names = self.task_names

        cin = channels[self.input_level]
        self.preliminary = nn.ModuleDict(
            {t: nn.Sequential(ConvBNReLU(cin, cin, norm=norm), ConvBNReLU(cin, task_channels, norm=norm)) for t in names}
        )
        self.aux_heads = nn.ModuleDict({t: nn.Conv2d(task_channels, s.out_channels, 1) for t, s in tasks.items()})
        self.embed = nn.ModuleDict(
            {t: nn.Conv2d(task_channels + s.out_channels, dim0, 1) for t, s in tasks.items()}
        )
        self.up_embed = nn.ModuleList(
            [nn.ModuleDict()]
            + [nn.ModuleDict({t: UpEmbed(self.dims[k - 1], self.dims[k], norm) for t in names}) for k in range(1, num_stages)]
        )
        self.skip_proj = nn.ModuleList(
            [nn.Identity()]
            + [nn.Conv2d(channels[self.skip_levels[k]], self.dims[k], 3, padding=1) for k in range(1, num_stages)]
        )
        self.blocks = nn.ModuleList(
            JointTaskBlock(names, self.dims[k], num_heads, mlp_ratio, q_stride, kv_strides[k], kv_proj, drop_path, k > 0 and message_passing)
            for k in range(num_stages)
        )
        self.readout_norm = nn.ModuleList(nn.ModuleDict({t: nn.LayerNorm(self.dims[k]) for t in names}) for k in range(num_stages))
        self.readout = nn.ModuleList(
            nn.ModuleDict({t: (nn.Conv2d(self.dims[k], dim0, 1) if k else nn.Identity()) for t in names})
            for k in range(num_stages)
        )
        self.final = nn.ModuleDict({t: ConvBNReLU(dim0, dim0, norm=norm) for t in names})
        self.heads = nn.ModuleDict({t: nn.Conv2d(dim0, s.out_channels, 1) for t, s in tasks.items()})
        self.message_passing = message_passing
        self._init_weights()

    @staticmethod
    def _skip_level(strides: list[int], stride: int, stage: int) -> int:
        if len(set(strides)) == 1:  # plain ViT: all levels share a stride; deeper stages take shallower layers
            return max(0, len(strides) - 1 - stage)
        return min(range(len(strides)), key=lambda i: (abs(math.log2(strides[i] / stride)), strides[i]))

    def _init_weights(self) -> None:
        for m in [*self.blocks.modules(), *self.readout_norm.modules()]:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.size_divisor)
        psize = tuple(padded.shape[-2:])
        feats = list(self.backbone(padded))
        used = sorted({self.input_level, *[lv for lv in self.skip_levels if lv is not None]})
        for i, f in zip(used, graph_boundary([feats[i] for i in used])):
            feats[i] = f

        x = resize_to(feats[self.input_level], _grid(psize, self.stage_strides[0]))
        aux, maps = {}, {}
        for t in self.task_names:  # every task's tokens are needed: all tasks attend to all
            f = self.preliminary[t](x)
            pred = self.aux_heads[t](f)
            if t in tasks:
                aux[t] = pred
            maps[t] = self.embed[t](torch.cat([f, pred], 1))

        message: dict | None = {} if self.message_passing else None
        out_size = _grid(psize, self.output_stride)
        fused: dict[str, Tensor] = {}
        for k, block in enumerate(self.blocks):
            if k:
                skip = resize_to(self.skip_proj[k](feats[self.skip_levels[k]]), _grid(psize, self.stage_strides[k]))
                maps = {t: self.up_embed[k][t](m) + skip for t, m in maps.items()}
            maps = block(maps, message)
            for t in tasks:
                r = self.readout_norm[k][t](maps[t].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                r = resize_to(self.readout[k][t](r), out_size)
                fused[t] = r if k == 0 else fused[t] + r

        out = {t: crop_to(self.heads[t](self.final[t](fused[t])), psize, size) for t in tasks}
        deep = {t: [crop_to(p, psize, size)] for t, p in aux.items()} if self.training else {}
        return model_output(out, deep_supervision=deep, shared=[feats[i] for i in used])

    # ------------------------------------------------------------------ contract

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for k in range(self.num_stages):
            yield from self.readout_norm[k][task].parameters()
            yield from self.readout[k][task].parameters()
        yield from self.blocks[-1].attn.conv_q[task].parameters()
        yield from self.final[task].parameters()
        yield from self.heads[task].parameters()
