"""TaskPrompter (Ye & Xu, "TaskPrompter: Spatial-Channel Multi-Task Prompting for Dense Scene
Understanding", ICLR 2023) on a timm `VisionTransformer`.

`TaskPromptViT` runs the ViT's own blocks (walked one by one through their public submodules) on
[task prompts; patch tokens]: T x prompt_len learnable prompt tokens (initialised N(1, 1) truncated,
as in the release) are concatenated to the patch tokens (the class/register tokens are dropped) and
*carried* through all layers, updated by the same attention and MLP as the patches.  In each layer:

* spatial prompting: joint self-attention over prompts and patches; the raw (pre-softmax) scores of
  task t's prompts against the patches, one h x w map per head (and prompt), weight that head's
  channel slice of the patch map: the spatial task feature x + A_t (.) x;
* channel prompting: a per-layer linear map turns each prompt into a "channel prompt" over the
  N = h x w patch positions; within each of `channel_heads` windows it attends over the C channels
  of the (normed) patch tokens (query = channel prompt, key = value = the window's patch tokens as
  C vectors of window-size); the raw scores (C weights per task and window) give the channel task
  feature x + a_t (.) x, and the attention output is mapped back to C and added to the prompts.

At the tapped layers (`layers`, default depth/4, depth/2, 3depth/4 and the last, whose tokens get
the ViT's final norm) each task's spatial and channel features are 1x1-projected, concatenated and
fused (1x1, 3x3, BN, GELU, 1x1), summed over the taps and upsampled x4 (stride 16 -> 4); a conv head
per task decodes them (`TaskPrompterDecoder`).

Departures from the release: the channel-prompt output (attention x value) is what updates the
prompts (the release adds the re-projected channel prompts themselves and leaves that output
unused); the channel-prompt maps are defined on the ViT's configured grid (`img_size`) and resized
bilinearly when an input gives another grid; prompts with prompt_len > 1 average their channel
scores; cross-task reweighting (`use_ctr`: on in the release's PASCAL configs, off in its NYUD
ones) is not implemented.
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
from mtvision.models.decoders.invpt import crop_to, pad_to_multiple
from mtvision.models.heads import TaskHead, resize_to
from mtvision.tasks import Task

_BLOCK_PARTS = ("norm1", "attn", "norm2", "mlp")
_ATTN_PARTS = ("qkv", "proj", "num_heads")


class TaskPromptError(MTVisionError, ValueError):
    """The backbone cannot carry task prompts (not a plain timm VisionTransformer)."""


def _windows(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


class TaskPromptViT(nn.Module):
    """A timm VisionTransformer carrying spatial-channel task prompts; returns per-task features at
    stride patch/4 (see the module docstring)."""

    def __init__(self, vit: nn.Module, task_names: Sequence[str], prompt_len: int = 1, channel_heads: int = 16,
                 layers: Sequence[int] | None = None, feature_channels: int = 768, out_channels: int = 768):
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
        self.to_channel = nn.ModuleList(nn.Linear(dim, n0) for _ in range(last))
        # the prompts leaving the last tapped layer are not used: no update for them
        self.from_channel = nn.ModuleList(nn.Linear(n0, dim) for _ in range(last - 1))
        for name in ("cls_token", "reg_token"):  # replaced by the prompts, never read
            if getattr(vit, name, None) is not None:
                getattr(vit, name).requires_grad_(False)
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

    # ------------------------------------------------------------------ one layer
    def _layer(self, i: int, x: Tensor, p: Tensor, grid: tuple[int, int]):
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
        spatial = raw[:, :, :np_, np_:]  # B x heads x prompts x N

        # channel prompting on the (normed) patch tokens, window by window
        cp = self.to_channel[i](pn).reshape(b, np_, *self.grid0)
        cp = resize_to(cp, grid)
        xm = xn.transpose(1, 2).reshape(b, c, *grid)
        chan_scores = xm.new_zeros(b, np_, c, self.side, self.side)
        chan_out = torch.zeros_like(cp)
        for r, (h0, h1) in enumerate(_windows(grid[0], self.side)):
            for s, (w0, w1) in enumerate(_windows(grid[1], self.side)):
                qw = cp[:, :, h0:h1, w0:w1].flatten(2)
                kw = xm[:, :, h0:h1, w0:w1].flatten(2)
                if kw.shape[-1] == 0:
                    continue
                sc = qw @ kw.transpose(1, 2)  # B x prompts x C
                chan_scores[..., r, s] = sc
                a = (sc * kw.shape[-1] ** -0.5).softmax(-1)
                chan_out[:, :, h0:h1, w0:w1] = (a @ kw).reshape(b, np_, h1 - h0, w1 - w0)
        ls1 = getattr(blk, "ls1", nn.Identity())
        ls2 = getattr(blk, "ls2", nn.Identity())
        dp1 = getattr(blk, "drop_path1", nn.Identity())
        dp2 = getattr(blk, "drop_path2", nn.Identity())
        x = x + dp1(ls1(x_out))
        x = x + dp2(ls2(blk.mlp(blk.norm2(x))))
        if i < len(self.from_channel):
            p_out = p_out + self.from_channel[i](resize_to(chan_out, self.grid0).flatten(2))
            p = p + dp1(ls1(p_out))
            p = p + dp2(ls2(blk.mlp(blk.norm2(p))))
        return x, p, spatial, chan_scores

    # ------------------------------------------------------------------ task features
    def _task_features(self, j: int, x: Tensor, spatial: Tensor, chan: Tensor, grid, tasks) -> dict[str, Tensor]:
        b, n, c = x.shape
        xm = x.transpose(1, 2).reshape(b, c, *grid)
        L = self.prompt_len
        out = {}
        for t in tasks:
            i = self.task_names.index(t)
            a = spatial[:, :, i * L : (i + 1) * L].reshape(b, -1, *grid)  # B x (heads*L) x h x w
            groups = a.shape[1]
            sp = (xm.reshape(b, groups, c // groups, *grid) * a[:, :, None]).reshape(b, c, *grid) + xm
            w = chan[:, i * L : (i + 1) * L].mean(1)  # B x C x side x side
            rows, cols = _windows(grid[0], self.side), _windows(grid[1], self.side)
            hi = torch.cat([torch.full((h1 - h0,), r, dtype=torch.long) for r, (h0, h1) in enumerate(rows)]).to(x.device)
            wi = torch.cat([torch.full((w1 - w0,), s, dtype=torch.long) for s, (w0, w1) in enumerate(cols)]).to(x.device)
            ch = w[:, :, hi][:, :, :, wi] * xm + xm
            f = torch.cat([self.spatial_proj[j][t](sp), self.channel_proj[j][t](ch)], 1)
            out[t] = self.fuse[j][t](f)
        return out

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-task feature maps at stride patch_size / 4 for `tasks` (all by default)."""
        tasks = list(tasks or self.task_names)
        x, grid = self._embed(images)
        p = self.prompts[None].expand(x.shape[0], -1, -1)
        feats: dict[str, Tensor] = {}
        for i in range(self.layers[-1]):
            x, p, spatial, chan = self._layer(i, x, p, grid)
            if i + 1 in self.layers:
                j = self.layers.index(i + 1)
                tapped = self.vit.norm(x) if j == len(self.layers) - 1 else x
                for t, f in self._task_features(j, tapped, spatial, chan, grid, tasks).items():
                    feats[t] = f if t not in feats else feats[t] + f
        return {t: F.interpolate(f, scale_factor=4, mode="bilinear", align_corners=False) for t, f in feats.items()}

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Read-out convolutions of `task` (the prompts and channel maps feed every task's tokens)."""
        for j in range(len(self.layers)):
            yield from self.spatial_proj[j][task].parameters()
            yield from self.channel_proj[j][task].parameters()
            yield from self.fuse[j][task].parameters()


class TaskPrompterDecoder(MultiTaskDecoder):
    """TaskPrompter: a plain ViT backbone carrying spatial-channel task prompts, then a conv head per
    task on the prompt-derived task features (see the module docstring).

    Shared representation: none.  The prompts interact with the patch tokens in every layer, so no
    tensor separates shared from task-specific computation; calibrate at the 'params' level.
    Task parameters: task t's read-out convolutions and head.  `forward(images, [t])` runs the ViT
    with all prompts (they attend to each other) and only t's read-outs and head.  Inputs are
    padded to a multiple of the patch size and the outputs cropped back.

    Options:
        prompt_len: prompt tokens per task (1).
        channel_heads: windows of the channel prompting, a square number (16 = 4 x 4 in the release).
        layers: 1-based ViT layers whose tokens give task features (None: depth/4, depth/2,
            3 depth/4 and the last).
        feature_channels: width of the spatial / channel read-outs (768).
        embed_channels: width of the fused task features (768).
        head_channels: hidden width of each conv head (None: embed_channels).
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
    ):
        super().__init__(tasks)
        from timm.models._features import FeatureGetterNet

        backbone = make_backbone()
        body = backbone.body
        if not isinstance(body, FeatureGetterNet):
            raise TaskPromptError(f"taskprompter needs a plain ViT backbone, got {backbone.name!r} ({type(body).__name__})")
        self.prompter = TaskPromptViT(body.model, list(tasks), prompt_len, channel_heads, layers, feature_channels, embed_channels)
        self.backbone_name = backbone.name
        patch = self.prompter.vit.patch_embed.patch_size
        self.size_divisor = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        if isinstance(patch, (tuple, list)) and patch[0] != patch[1]:
            raise TaskPromptError(f"taskprompter needs square patches, got {tuple(patch)}")
        self.output_stride = max(1, self.size_divisor // 4)
        hidden = head_channels or embed_channels
        self.heads = nn.ModuleDict({t: TaskHead(embed_channels, s.out_channels, hidden) for t, s in tasks.items()})

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.size_divisor)
        feats = self.prompter(padded, tasks)
        return model_output({t: crop_to(self.heads[t](feats[t]), padded.shape[-2:], size) for t in tasks})

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.prompter.task_parameters(task)
        yield from self.heads[task].parameters()
