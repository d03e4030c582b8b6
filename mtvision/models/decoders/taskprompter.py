"""TaskPrompter (Ye & Xu, "TaskPrompter: Spatial-Channel Multi-Task Prompting for Dense Scene
Understanding", ICLR 2023) on a timm `VisionTransformer`, computing what the authors' release computes.

`TaskPromptViT` runs the ViT's own blocks (walked one by one through their public submodules) on
[task prompts; patch tokens]: T x prompt_len learnable prompt tokens (initialised N(1, 1) truncated
to [-2, 2], as in the release) are put before the patch tokens (the class token is not used) and
carried through the blocks, updated by the same LayerNorms, attention and MLP as the patches.  In
each block, with xn, pn the patch and prompt tokens after norm1:

* spatial prompting: joint self-attention over [pn; xn].  The raw (unscaled, pre-softmax) logits of
  task t's prompt against the patches give one h x w map per head; head g's map multiplies channel
  group g of the patch map X: the spatial feature of t is X + A_t (.) X.
* channel prompting: a per-block linear map `to_channel` (C -> N, N = the patch grid of the build
  size) turns each normed prompt into a "channel prompt" over the patch positions.  In each of the
  `channel_heads` windows (a sqrt x sqrt split of the patch grid) its dot products with the C
  channels of xn are the raw channel logits of t: the channel feature of t is X + a_t (.) X, a_t
  broadcast over the window's pixels.
* prompt update: the attention output of the prompt rows plus `from_channel` (N -> C) of the channel
  prompts, residual, then the block's MLP with its pre-norm residual (the same drop path as the
  patches).  The last block's update reaches nothing, so it has no `from_channel`.

At the tapped blocks (`layers`: depth/4, depth/2, 3 depth/4 and the last) each task's spatial and
channel features are 1x1-projected (`feature_channels`), concatenated and fused (1x1, 3x3, BN, GELU,
1x1, all convs with bias; `embed_channels`).  The last level reads the last block's tokens after the
ViT's final LayerNorm: build the backbone with `output_norm: last` (its norm is used here).
Cross-task reweighting (`cross_task_reweighting`, on in the release's PASCAL configs): per level and
task t, a 1x1 conv (heads -> heads), GELU and a 1x1 conv (heads -> 1) map the raw logits of t's
prompt against all T prompts to T weights (not normalised), and t's feature becomes the weighted sum
of all tasks' features.  The levels are summed, upsampled x4 (stride 16 -> 4), and each task's head
(3x3 conv with bias, BN, GELU, 1x1 conv) decodes them.

Saliency: `saliency_channels` 2 (the default, as the release's PASCAL models) gives 2-class logits.

Release facts that are not the paper's drawing: the release also computes the softmax channel
attention and its output, and discards them (commented-out code shows a variant in which that output
updated the prompts); only the raw channel logits and the channel prompts themselves are used.

mtvision extensions (no reference): inputs are padded to a multiple of the patch size; a grid other
than the build grid resizes the channel prompts bilinearly (the release runs at its build size
only); windows that do not divide the grid are rounded; with prompt_len > 1 the channel logits of a
task's prompts are averaged (the release's indexing assumes prompt_len 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import Tensor, nn

from mtvision.errors import MTVisionError
from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, model_output
from mtvision.models.decoders.invpt import crop_to, pad_to_multiple, task_output_channels
from mtvision.models.heads import resize_to
from mtvision.tasks import Task

_BLOCK_PARTS = ("norm1", "attn", "norm2", "mlp")
_ATTN_PARTS = ("qkv", "proj", "num_heads")


class TaskPromptError(MTVisionError, ValueError):
    """The backbone cannot carry task prompts (not a plain timm VisionTransformer)."""


def _windows(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    trunc_normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class PromptTaskHead(nn.Module):
    """TaskPrompter's head: 3x3 conv (with bias), BN, GELU, then a 1x1 conv to the task's channels."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden_channels, 3, padding=1), nn.BatchNorm2d(hidden_channels), nn.GELU())
        trunc_normal_(self.body[0].weight, std=0.02)
        self.out = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))


class TaskPromptViT(nn.Module):
    """A timm VisionTransformer carrying spatial-channel task prompts; returns per-task features at
    stride patch/4 (see the module docstring).  `final_norm` normalises the last tapped block's
    tokens (the ViT's final LayerNorm)."""

    def __init__(self, vit: nn.Module, task_names: Sequence[str], prompt_len: int = 1, channel_heads: int = 16,
                 layers: Sequence[int] | None = None, feature_channels: int = 768, out_channels: int = 768,
                 cross_task_reweighting: bool = False, final_norm: nn.Module | None = None):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise TaskPromptError(f"task prompts need a plain timm VisionTransformer, got {type(vit).__name__}")
        for i, blk in enumerate(vit.blocks):
            missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)] + [p for p in _ATTN_PARTS if not hasattr(blk.attn, p)]
            if missing or getattr(blk.attn, "gate", None) is not None:
                raise TaskPromptError(f"ViT block {i} ({type(blk).__name__}) lacks {missing or ['an ungated attention']}")
        side = math.isqrt(channel_heads)
        if side * side != channel_heads:
            raise ValueError(f"channel_heads must be a square number of windows, got {channel_heads}")
        if cross_task_reweighting and prompt_len != 1:
            raise ValueError(f"cross_task_reweighting needs prompt_len 1 (one prompt per task), got {prompt_len}")
        self.vit, self.task_names = vit, list(task_names)
        self.prompt_len, self.side = prompt_len, side
        depth = len(vit.blocks)
        self.layers = sorted({int(i) for i in (layers or [depth // 4, depth // 2, 3 * depth // 4, depth])})
        if self.layers[0] < 1 or self.layers[-1] > depth:
            raise ValueError(f"layers must lie in 1..{depth}, got {self.layers}")
        dim, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
        if dim % (heads * prompt_len):
            raise ValueError(f"embed dim {dim} must divide into heads x prompt_len = {heads * prompt_len} groups")
        self.grid0 = tuple(int(g) for g in vit.patch_embed.grid_size)
        n0 = self.grid0[0] * self.grid0[1]
        self.prompts = nn.Parameter(torch.empty(len(self.task_names) * prompt_len, dim))
        trunc_normal_(self.prompts, mean=1.0, std=1.0)
        last = self.layers[-1]
        self.to_channel = nn.ModuleList(_linear(dim, n0) for _ in range(last))
        # the prompts leaving the last block reach nothing: no update for them
        self.from_channel = nn.ModuleList(_linear(n0, dim) for _ in range(last - 1))
        for name in ("cls_token", "reg_token"):  # replaced by the prompts, never read
            if getattr(vit, name, None) is not None:
                getattr(vit, name).requires_grad_(False)
        self.final_norm = final_norm if final_norm is not None else nn.Identity()
        names = self.task_names
        self.spatial_proj = nn.ModuleList(nn.ModuleDict({t: nn.Conv2d(dim, feature_channels, 1) for t in names}) for _ in self.layers)
        self.channel_proj = nn.ModuleList(nn.ModuleDict({t: nn.Conv2d(dim, feature_channels, 1) for t in names}) for _ in self.layers)
        self.fuse = nn.ModuleList(
            nn.ModuleDict({
                t: nn.Sequential(
                    nn.Conv2d(2 * feature_channels, out_channels, 1),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.GELU(),
                    nn.Conv2d(out_channels, out_channels, 1),
                )
                for t in names
            })
            for _ in self.layers
        )
        self.ctr = (
            nn.ModuleList(
                nn.ModuleDict({t: nn.Sequential(nn.Conv2d(heads, heads, 1), nn.GELU(), nn.Conv2d(heads, 1, 1)) for t in names})
                for _ in self.layers
            )
            if cross_task_reweighting
            else None
        )

    # ------------------------------------------------------------------ embedding
    def _embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        vit = self.vit
        x = vit.patch_embed(images)
        if x.ndim == 4:  # dynamic size: NHWC
            grid = (x.shape[1], x.shape[2])
            x = x.flatten(1, 2)
        else:
            grid = self.grid0
        if vit.pos_embed is not None:
            prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
            pos = vit.pos_embed
            if grid != self.grid0:
                pos = resample_abs_pos_embed(pos, new_size=grid, old_size=self.grid0, num_prefix_tokens=prefix)
            x = x + pos[:, prefix:]
        x = vit.pos_drop(x)
        return vit.norm_pre(x), grid

    # ------------------------------------------------------------------ one block
    def _layer(self, i: int, x: Tensor, p: Tensor, grid: tuple[int, int]):
        """Block i on patches x and prompts p -> (x, p, raw logits of the prompt rows against
        [prompts; patches] (B x heads x P x (P + N)), raw channel logits (B x P x C x side x side))."""
        blk, attn_mod = self.vit.blocks[i], self.vit.blocks[i].attn
        b, n, c = x.shape
        heads = attn_mod.num_heads
        xn, pn = blk.norm1(x), blk.norm1(p)
        z = torch.cat([pn, xn], 1)
        qkv = attn_mod.qkv(z).reshape(b, z.shape[1], 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if hasattr(attn_mod, "q_norm"):
            q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
        raw = q @ k.transpose(-2, -1)
        attn = (raw * (c // heads) ** -0.5).softmax(-1)
        if hasattr(attn_mod, "attn_drop"):
            attn = attn_mod.attn_drop(attn)
        o = (attn @ v).transpose(1, 2).reshape(b, z.shape[1], c)
        if hasattr(attn_mod, "norm"):
            o = attn_mod.norm(o)
        o = attn_mod.proj(o)
        if hasattr(attn_mod, "proj_drop"):
            o = attn_mod.proj_drop(o)
        np_ = p.shape[1]
        p_out, x_out = o[:, :np_], o[:, np_:]

        # channel prompts and their raw logits against the channels of the normed patches, per window
        cp = self.to_channel[i](pn)  # B x prompts x N0
        cmap = resize_to(cp.reshape(b, np_, *self.grid0), grid)
        xm = xn.transpose(1, 2).reshape(b, c, *grid)
        chan_scores = xm.new_zeros(b, np_, c, self.side, self.side)
        for r, (h0, h1) in enumerate(_windows(grid[0], self.side)):
            for s, (w0, w1) in enumerate(_windows(grid[1], self.side)):
                if h1 > h0 and w1 > w0:
                    chan_scores[..., r, s] = cmap[:, :, h0:h1, w0:w1].flatten(2) @ xm[:, :, h0:h1, w0:w1].flatten(2).transpose(1, 2)
        ls1 = getattr(blk, "ls1", nn.Identity())
        ls2 = getattr(blk, "ls2", nn.Identity())
        dp1 = getattr(blk, "drop_path1", nn.Identity())
        dp2 = getattr(blk, "drop_path2", nn.Identity())
        x = x + dp1(ls1(x_out))
        x = x + dp2(ls2(blk.mlp(blk.norm2(x))))
        if i < len(self.from_channel):
            p_out = p_out + self.from_channel[i](cp)
            p = p + dp1(ls1(p_out))
            p = p + dp2(ls2(blk.mlp(blk.norm2(p))))
        return x, p, raw[:, :, :np_], chan_scores

    # ------------------------------------------------------------------ task features
    def _task_features(self, j: int, x: Tensor, raw: Tensor, chan: Tensor, grid, tasks) -> dict[str, Tensor]:
        b, n, c = x.shape
        xm = x.transpose(1, 2).reshape(b, c, *grid)
        L, P = self.prompt_len, raw.shape[2]
        spatial = raw[..., P:]
        rows, cols = _windows(grid[0], self.side), _windows(grid[1], self.side)
        hi = torch.cat([torch.full((h1 - h0,), r, dtype=torch.long) for r, (h0, h1) in enumerate(rows)]).to(x.device)
        wi = torch.cat([torch.full((w1 - w0,), s, dtype=torch.long) for s, (w0, w1) in enumerate(cols)]).to(x.device)
        need = self.task_names if self.ctr is not None else tasks
        feats = {}
        for t in need:
            i = self.task_names.index(t)
            a = spatial[:, :, i * L : (i + 1) * L].reshape(b, -1, *grid)  # B x (heads*L) x h x w
            groups = a.shape[1]
            sp = (xm.reshape(b, groups, c // groups, *grid) * a[:, :, None]).reshape(b, c, *grid) + xm
            w = chan[:, i * L : (i + 1) * L].mean(1)  # B x C x side x side
            ch = w[:, :, hi][:, :, :, wi] * xm + xm
            f = torch.cat([self.spatial_proj[j][t](sp), self.channel_proj[j][t](ch)], 1)
            feats[t] = self.fuse[j][t](f)
        if self.ctr is None:
            return feats
        out = {}
        for t in tasks:
            i = self.task_names.index(t)
            weights = self.ctr[j][t](raw[:, :, i : i + 1, :P])  # B x 1 x 1 x T, not normalised
            out[t] = sum(weights[..., u : u + 1] * feats[s] for u, s in enumerate(self.task_names))
        return out

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-task feature maps at stride patch_size / 4 for `tasks` (all by default)."""
        tasks = list(tasks or self.task_names)
        x, grid = self._embed(images)
        p = self.prompts[None].expand(x.shape[0], -1, -1)
        feats: dict[str, Tensor] = {}
        for i in range(self.layers[-1]):
            x, p, raw, chan = self._layer(i, x, p, grid)
            if i + 1 in self.layers:
                j = self.layers.index(i + 1)
                tapped = self.final_norm(x) if j == len(self.layers) - 1 else x
                for t, f in self._task_features(j, tapped, raw, chan, grid, tasks).items():
                    feats[t] = f if t not in feats else feats[t] + f
        return {t: F.interpolate(f, scale_factor=4, mode="bilinear", align_corners=False) for t, f in feats.items()}

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """What only `task`'s features depend on: its read-out convolutions, or with cross-task
        reweighting (which mixes every task's read-outs) its reweighting convolutions."""
        for j in range(len(self.layers)):
            if self.ctr is not None:
                yield from self.ctr[j][task].parameters()
                continue
            yield from self.spatial_proj[j][task].parameters()
            yield from self.channel_proj[j][task].parameters()
            yield from self.fuse[j][task].parameters()


class TaskPrompterDecoder(MultiTaskDecoder):
    """TaskPrompter: a plain ViT backbone carrying spatial-channel task prompts, then a conv head per
    task on the prompt-derived task features (see the module docstring).

    Shared representation: none.  The prompts interact with the patch tokens in every layer, so no
    tensor separates shared from task-specific computation; calibrate at the 'params' level.
    Task parameters: task t's read-out convolutions (its reweighting convolutions instead, with
    cross-task reweighting) and head.  `forward(images, [t])` runs the ViT with all prompts (they
    attend to each other) and only what t's output needs.  Inputs are padded to a multiple of the
    patch size and the outputs cropped back.

    Options:
        prompt_len: prompt tokens per task (1).
        channel_heads: windows of the channel prompting, a square number (16 = 4 x 4; the release's
            ViT-L PASCAL config uses 1).
        layers: 1-based ViT layers whose tokens give task features (None: depth/4, depth/2,
            3 depth/4 and the last).
        feature_channels: width of the spatial / channel read-outs (768; the release's embed_dim).
        embed_channels: width of the fused task features (768; the release's final_embed_dim).
        head_channels: hidden width of each head (None: embed_channels, as the release).
        cross_task_reweighting: the release's CTR (its use_ctr: on for PASCAL, off for NYUD).
        saliency_channels: 2 (background/salient logits, the release) or 1 (one logit).
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        prompt_len: int = 1,
        channel_heads: int = 16,
        layers: Sequence[int] | None = None,
        feature_channels: int = 768,
        embed_channels: int = 768,
        head_channels: int | None = None,
        cross_task_reweighting: bool = False,
        saliency_channels: int = 2,
    ):
        super().__init__(tasks)
        from timm.models._features import FeatureGetterNet

        backbone = make_backbone()
        body = backbone.body
        if not isinstance(body, FeatureGetterNet):
            raise TaskPromptError(f"taskprompter needs a plain ViT backbone, got {backbone.name!r} ({type(body).__name__})")
        if backbone.output_norm == "all":
            raise TaskPromptError("taskprompter normalises only the last read-out: use backbone.output_norm 'last' (or 'none')")
        final_norm = backbone.output_norms[str(len(backbone.levels) - 1)] if backbone.output_norm == "last" else None
        self.prompter = TaskPromptViT(body.model, list(tasks), prompt_len, channel_heads, layers, feature_channels,
                                      embed_channels, cross_task_reweighting, final_norm)
        self.backbone_name = backbone.name
        patch = self.prompter.vit.patch_embed.patch_size
        self.size_divisor = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        if isinstance(patch, (tuple, list)) and patch[0] != patch[1]:
            raise TaskPromptError(f"taskprompter needs square patches, got {tuple(patch)}")
        self.output_stride = max(1, self.size_divisor // 4)
        hidden = head_channels or embed_channels
        outs = task_output_channels(tasks, saliency_channels)
        self.heads = nn.ModuleDict({t: PromptTaskHead(embed_channels, outs[t], hidden) for t in tasks})

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.size_divisor)
        feats = self.prompter(padded, tasks)
        return model_output({t: crop_to(self.heads[t](feats[t]), padded.shape[-2:], size) for t in tasks})

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.prompter.task_parameters(task)
        yield from self.heads[task].parameters()
