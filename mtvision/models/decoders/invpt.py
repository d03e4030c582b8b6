"""Cross-task attention decoder: InvPT (Ye & Xu, "Inverted Pyramid Multi-task Transformer for Dense
Scene Understanding", ECCV 2022), computing what the authors' release computes.

With the release's settings (ViT-L/16 of width C, T tasks, d_0 = task_channels + prediction_channels
= 512 + 64 = 576):

1. Input: the backbone's last level resized bilinearly to stride `input_stride` (32).  For a ViT
   that level is the last block's tokens after the ViT's final LayerNorm: build the backbone with
   `output_norm: last` (the other levels stay un-normed, as in the release).
2. Per task t: a preliminary decoder (two 3x3 conv-BN-ReLU without bias, C -> C -> task_channels)
   gives F_t; a 1x1 conv gives the preliminary prediction P_t (`deep_supervision[t]` in training);
   a 1x1 conv re-embeds [F_t, P_t] into d_0 channels.
3. Stage k = 0 .. num_stages-1 runs at stride input_stride / 2^k with width d_k = d_0 / 2^k.
   * k >= 1: every task map is up-embedded (bilinear x2, two dilated 3x3 conv-BN-ReLU without bias)
     and the stage's skip map is added to each of them.
   * One transformer block over the tokens of all tasks together: pre-norm; per task, Q is a
     depth-wise 3x3 stride-2 conv + BN and K = V an average pooling with kernel = stride =
     kv_strides[k] (ceil mode); shared linear q/k/v projections with bias; 2 heads; the scores are
     scaled by d_k^-0.5 (the stage width, not the head width).  From stage 1 on, the previous
     stage's scores (pre-softmax, after its own fusion), upsampled bilinearly over each query task's
     grid, are stacked with this stage's along the head axis and fused by a 1x1 conv
     (2 x heads -> heads); the fused scores feed the softmax and become the next stage's message.
     The output, at the query grid, is resized bilinearly back to the stage grid; residual, then an
     MLP (ratio 4, GELU) with its pre-norm residual.
   * Read-out: one LayerNorm over the channels of all tasks jointly (T x d_k), then task t's block
     of d_k channels, a 1x1 conv to d_0 (stages k >= 1), resized bilinearly to stride 4; the stages
     are summed per task.
4. Per task: a 3x3 conv with bias, BN, ReLU, then the 1x1 head.

Skips (what is added in stage k >= 1): with a single-stride backbone (a plain ViT tapped after
blocks 6, 12, 18 and 24) stage k takes level L-2-k: stage 1 the level after block 12 through a 3x3
conv, stage 2 the level after block 6 through a 3x3 stride-2 transposed conv (output padding 1);
the level after block 18 is not used, as in the release.  A multi-scale backbone gives each stage
the level whose stride is closest to the stage's, through a 3x3 conv (resized when the strides
differ): an mtvision extension without reference.

Saliency: `saliency_channels` 2 (the default, as the release's PASCAL models) makes the saliency
head and its preliminary prediction 2-class logits (background, salient); these 2 channels are what
the re-embedding reads.  1 gives one logit.

Sizes: the release runs at its build size only (448x576 NYUD, 512x512 PASCAL), where every stage's
query grid is exactly half the next stage's.  Here inputs are zero-padded bottom/right to a multiple
of 2 x input_stride (64), which keeps that geometry, and outputs are cropped back.

Release facts that are not the paper's drawing: the decoder's drop-path rate is declared as 0.15 but
with one block per stage it evaluates to 0 (`drop_path` defaults to 0).  The release also builds
modules it never uses (a projection of the level after block 18, a stage-0 read-out conv, the
stage-0 score-fusion conv and one more LayerNorm); they are not built here (the converter,
mtvision/convert/invpt.py, names them as skipped).
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

KV_PROJECTIONS = ("avg", "dwconv")
SALIENCY_CHANNELS = (1, 2)


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


def task_output_channels(tasks: dict[str, Task], saliency_channels: int) -> dict[str, int]:
    """Output channels per task: the task's own, except saliency with `saliency_channels` (1: one
    logit; 2: background / salient logits, the layout of the InvPT and TaskPrompter releases)."""
    if saliency_channels not in SALIENCY_CHANNELS:
        raise ValueError(f"saliency_channels must be 1 or 2, got {saliency_channels!r}")
    return {t: (saliency_channels if t == "saliency" else s.out_channels) for t, s in tasks.items()}


def _grid(size: Sequence[int], stride: int) -> tuple[int, int]:
    return (size[0] // stride, size[1] // stride)


# ---------------------------------------------------------------------------- attention
class ConvProjection(nn.Module):
    """A map -> a smaller map: average pooling (kernel = stride, ceil mode) or a depth-wise conv + BN."""

    def __init__(self, channels: int, stride: int, kind: str = "avg"):
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
    """Multi-head attention over the concatenated tokens of all tasks: per-task strided depth-wise
    conv + BN queries, per-task pooled keys/values, shared linear projections, scores scaled by
    dim^-0.5, and score message passing from the previous stage (`message`)."""

    def __init__(self, task_names: Sequence[str], dim: int, num_heads: int, q_stride: int, kv_stride: int,
                 kv_proj: str = "avg", qkv_bias: bool = True, message: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = dim**-0.5
        self.conv_q = nn.ModuleDict({t: ConvProjection(dim, q_stride, "dwconv") for t in task_names})
        self.conv_k = nn.ModuleDict({t: ConvProjection(dim, kv_stride, kv_proj) for t in task_names})
        self.conv_v = nn.ModuleDict({t: ConvProjection(dim, kv_stride, kv_proj) for t in task_names})
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fuse_message = nn.Conv2d(2 * num_heads, num_heads, 1) if message else None

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _scores(self, maps: dict[str, Tensor], message: dict | None):
        names = list(maps)
        qs = [self.conv_q[t](maps[t]) for t in names]
        ks = [self.conv_k[t](maps[t]) for t in names]
        vs = [self.conv_v[t](maps[t]) for t in names]
        q_grid, k_grid = tuple(qs[0].shape[-2:]), tuple(ks[0].shape[-2:])

        def flat(xs: list[Tensor]) -> Tensor:
            return torch.cat([x.flatten(2).transpose(1, 2) for x in xs], 1)

        q = self._heads(self.proj_q(flat(qs)))
        k = self._heads(self.proj_k(flat(ks)))
        v = self._heads(self.proj_v(flat(vs)))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if message is not None and self.fuse_message is not None and message.get("scores") is not None:
            prev = resize_scores(message["scores"], len(names), message["q"], q_grid, message["k"], k_grid)
            scores = self.fuse_message(torch.cat([scores, prev], 1))
        if message is not None:
            message.update(scores=scores, q=q_grid, k=k_grid)
        return scores, v, q_grid

    def attention_map(self, maps: dict[str, Tensor], message: dict | None = None) -> Tensor:
        """The softmax attention, B x heads x (T * query grid) x (T * key grid), for inspection."""
        return self._scores(maps, message)[0].softmax(-1)

    def forward(self, maps: dict[str, Tensor], message: dict | None = None) -> dict[str, Tensor]:
        """Per-task B x C x h x w maps -> per-task attention outputs at the same grid; reads and
        replaces `message['scores', 'q', 'k']` (the previous stage's scores and grids)."""
        size = next(iter(maps.values())).shape[-2:]
        scores, v, q_grid = self._scores(maps, message)
        out = self.proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
        nq = q_grid[0] * q_grid[1]
        result = {}
        for i, t in enumerate(maps):
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
    def channel_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
        """LayerNorm over the channels of an N x C x H x W map."""
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def normed(self, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """The attention's input: every task map after norm1."""
        return {t: self.channel_norm(self.norm1, x) for t, x in maps.items()}

    def forward(self, maps: dict[str, Tensor], message: dict | None) -> dict[str, Tensor]:
        attended = self.attn(self.normed(maps), message)
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


def skip_projection(in_channels: int, out_channels: int, level_stride: int, stage_stride: int) -> nn.Module:
    """A backbone level -> a stage's skip map: a 3x3 stride-2 transposed conv when the level is twice
    as coarse as the stage (the release's ViT stage 2), a 3x3 conv otherwise."""
    if level_stride == 2 * stage_stride:
        return nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


# ---------------------------------------------------------------------------- decoder
class CrossTaskAttentionDecoder(MultiTaskDecoder):
    """InvPT: per-task preliminary decoders, then an inverted pyramid of joint all-task attention
    stages with attention message passing and backbone skips, then per-task heads (see the module
    docstring for the exact computation).

    Shared representation: the backbone feature maps the decoder consumes (the input level and the
    skip levels).  Every task's loss flows through them, but the joint-attention stages after them
    are *shared* parameters that no single tensor separates from the heads: feature-level gradient
    calibration does not reach them, so calibrate this decoder at the 'params' level.
    Task parameters: task t's stage read-out convs, final conv and head (the read-out LayerNorm spans
    all tasks, so everything before it is shared).  `forward(images, [t])` still runs every task's
    tokens through the stages (t attends to them); it skips the other tasks' read-outs, heads and
    aux outputs.

    Options:
        task_channels: width of the preliminary task features (512 in the release).
        prediction_channels: extra token width for the re-embedded predictions (64); the stage-0
            width is task_channels + prediction_channels, halved at each stage.
        num_stages: stages (3); stage k at stride input_stride / 2^k.
        input_stride: stride of the first stage (32).
        num_heads: attention heads per stage (2).
        mlp_ratio: MLP expansion (4).
        q_stride: stride of the depth-wise conv query projection (2).
        kv_strides: key/value pooling stride per stage ((2, 4, 8): a constant key count).
        kv_proj: "avg" (average pooling, the release) or "dwconv" (depth-wise conv + BN).
        message_passing: pass fused attention scores from stage to stage (True).
        drop_path: stochastic depth rate in every stage (0, the release's effective rate).
        norm: "bn" or "gn" in the convolutional parts.
        saliency_channels: 2 (background/salient logits, the release) or 1 (one logit).
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
        kv_proj: str = "avg",
        message_passing: bool = True,
        drop_path: float = 0.0,
        norm: str = "bn",
        saliency_channels: int = 2,
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
        self.out_channels = task_output_channels(tasks, saliency_channels)
        self.input_stride, self.num_stages = input_stride, num_stages
        self.stage_strides = [input_stride >> k for k in range(num_stages)]
        self.output_stride = self.stage_strides[-1] // 2
        self.size_divisor = max(max(strides), 2 * input_stride)
        dim0 = task_channels + prediction_channels
        self.dims = [dim0 >> k for k in range(num_stages)]
        if min(self.dims) < num_heads:
            raise ValueError(f"stage widths {self.dims} are too narrow for {num_heads} heads")
        self.input_level = len(strides) - 1
        self.skip_levels = [None] + [self._skip_level(strides, s, k) for k, s in enumerate(self.stage_strides) if k]
        names, outs = self.task_names, self.out_channels

        cin = channels[self.input_level]
        self.preliminary = nn.ModuleDict(
            {t: nn.Sequential(ConvBNReLU(cin, cin, norm=norm), ConvBNReLU(cin, task_channels, norm=norm)) for t in names}
        )
        self.aux_heads = nn.ModuleDict({t: nn.Conv2d(task_channels, outs[t], 1) for t in names})
        self.embed = nn.ModuleDict({t: nn.Conv2d(task_channels + outs[t], dim0, 1) for t in names})
        self.up_embed = nn.ModuleList(
            [nn.ModuleDict()]
            + [nn.ModuleDict({t: UpEmbed(self.dims[k - 1], self.dims[k], norm) for t in names}) for k in range(1, num_stages)]
        )
        self.skip_proj = nn.ModuleList(
            [nn.Identity()]
            + [
                skip_projection(channels[self.skip_levels[k]], self.dims[k], strides[self.skip_levels[k]], self.stage_strides[k])
                for k in range(1, num_stages)
            ]
        )
        self.blocks = nn.ModuleList(
            JointTaskBlock(names, self.dims[k], num_heads, mlp_ratio, q_stride, kv_strides[k], kv_proj, drop_path,
                           k > 0 and message_passing)
            for k in range(num_stages)
        )
        # one LayerNorm over all tasks' channels per stage (task blocks in task order)
        self.readout_norm = nn.ModuleList(nn.LayerNorm(len(names) * d) for d in self.dims)
        self.readout = nn.ModuleList(
            nn.ModuleDict({t: (nn.Conv2d(self.dims[k], dim0, 1) if k else nn.Identity()) for t in names})
            for k in range(num_stages)
        )
        self.final = nn.ModuleDict(
            {t: nn.Sequential(nn.Conv2d(dim0, dim0, 3, padding=1), make_norm(norm, dim0), nn.ReLU(inplace=True)) for t in names}
        )
        self.heads = nn.ModuleDict({t: nn.Conv2d(dim0, outs[t], 1) for t in names})
        self.message_passing = message_passing
        self._init_weights()

    @staticmethod
    def _skip_level(strides: list[int], stride: int, stage: int) -> int:
        if len(set(strides)) == 1:  # plain ViT: levels share a stride; stage k takes level L-2-k
            return max(0, len(strides) - 2 - stage)
        return min(range(len(strides)), key=lambda i: (abs(math.log2(strides[i] / stride)), strides[i]))

    def _init_weights(self) -> None:
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for seq in self.final.values():
            trunc_normal_(seq[0].weight, std=0.02)

    # ------------------------------------------------------------------ forward
    def _readout(self, k: int, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage k's maps after the joint LayerNorm, split back per task."""
        joint = torch.cat([maps[t] for t in self.task_names], 1)
        joint = JointTaskBlock.channel_norm(self.readout_norm[k], joint)
        return dict(zip(self.task_names, joint.split(self.dims[k], 1)))

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
                grid = _grid(psize, self.stage_strides[k])
                skip = resize_to(self.skip_proj[k](feats[self.skip_levels[k]]), grid)
                maps = {t: self.up_embed[k][t](m) + skip for t, m in maps.items()}
            maps = block(maps, message)
            normed = self._readout(k, maps)
            for t in tasks:
                r = resize_to(self.readout[k][t](normed[t]), out_size)
                fused[t] = r if k == 0 else fused[t] + r

        out = {t: crop_to(self.heads[t](self.final[t](fused[t])), psize, size) for t in tasks}
        deep = {t: [crop_to(p, psize, size)] for t, p in aux.items()} if self.training else {}
        return model_output(out, deep_supervision=deep, shared=[feats[i] for i in used])

    # ------------------------------------------------------------------ contract

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for k in range(self.num_stages):
            yield from self.readout[k][task].parameters()
        yield from self.final[task].parameters()
        yield from self.heads[task].parameters()
