"""mmsegmentation's Swin Transformer behaviour on timm's Swin (the backbone of the MTMamba releases).

mmseg 1.2.2's `SwinTransformer` and timm's compute the same layers except in three places:

* shifted windows: mmseg zero-pads each map (bottom/right) to a multiple of the window *before* the
  cyclic shift, so the zero rows and columns are rolled with the map, and builds the shift mask on
  the padded map (the padded tokens take part as keys and values; only the shift regions are
  masked).  timm rolls first and pads afterwards.
* small maps: mmseg never shrinks the window or drops the shift on a map no larger than the window
  (timm's default does, like the original Swin); timm's `always_partition=True` keeps them.
* PatchMerging: mmseg gathers the 2x2 neighbours with `nn.Unfold`, channel-major
  ([c0: (0,0), (0,1), (1,0), (1,1), c1: ...]); timm concatenates them position-major in the order
  (0,0), (1,0), (0,1), (1,1).  Only weights converted from mmseg need care: `mmseg_merging_to_timm`.

`use_mmseg_windows(model)` gives every block of a timm Swin mmseg's window attention; parameter
names stay timm's.  mmseg's LayerNorm on every returned level is the backbone's `output_norm="all"`
(eps 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

MASK_VALUE = -100.0
"""The attention logit offset between tokens of different shift regions (mmseg's and timm's value)."""


def _region_labels(size: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Per position along one axis of the rolled, padded map: 0 before the last window, 1 in the
    last window before the wrapped-around part, 2 in the last `shift` positions."""
    index = torch.arange(size, device=device)
    return (index >= size - window).long() + (index >= size - shift).long()


def shift_window_mask(
    height: int,
    width: int,
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The (windows, N, N) attention mask of shifted windows on a `height` x `width` map (already a
    multiple of `window`): 0 between tokens of the same shift region, MASK_VALUE otherwise."""
    rows = _region_labels(height, window[0], shift[0], device)
    cols = _region_labels(width, window[1], shift[1], device)
    labels = (3 * rows[:, None] + cols[None, :]).to(dtype)[None, :, :, None]  # 1 x H x W x 1
    windows = window_partition(labels, window).flatten(1)  # windows x N
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differ.shape, device=device, dtype=dtype).masked_fill(differ, MASK_VALUE)


class MMSegWindowBlock(SwinTransformerBlock):
    """timm's Swin block with mmseg's shifted-window attention: pad to window multiples, roll,
    attend within windows (shift mask of the padded map), roll back, crop."""

    def _attn(self, x: Tensor) -> Tensor:
        _, height, width, channels = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
        hp, wp = x.shape[1:3]
        shifted = any(self.shift_size)
        mask = None
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = shift_window_mask(hp, wp, self.window_size, self.shift_size, x.device, x.dtype)
        windows = window_partition(x, self.window_size).view(-1, wh * ww, channels)
        windows = self.attn(windows, mask=mask).view(-1, wh, ww, channels)
        x = window_reverse(windows, self.window_size, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width].contiguous()


def use_mmseg_windows(model: nn.Module) -> int:
    """Give every timm `SwinTransformerBlock` in `model` mmseg's window attention (in place); returns
    the number of blocks changed.  ValueError when the model has no Swin blocks, or when a block
    shrank its window or dropped its shift (build the timm model with `always_partition=True`)."""
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    if not blocks:
        raise ValueError("the model has no timm Swin Transformer blocks")
    for block in blocks:
        if not block.always_partition:
            raise ValueError("mmseg's windows need a timm Swin built with always_partition=True (no window shrinking)")
        block.__class__ = MMSegWindowBlock
    return len(blocks)


def mmseg_merging_to_timm(weight: Tensor) -> Tensor:
    """A PatchMerging tensor whose last axis (4C) is in mmseg's unfold order (channel-major,
    neighbours (0,0), (0,1), (1,0), (1,1)) -> timm's order (neighbour-major: (0,0), (1,0), (0,1),
    (1,1)).  Applies to `reduction.weight` (2C x 4C) and to `norm.weight` / `norm.bias` (4C)."""
    four_c = weight.shape[-1]
    if four_c % 4:
        raise ValueError(f"a PatchMerging axis has 4C entries, got {four_c}")
    lead = weight.shape[:-1]
    per_channel = weight.reshape(*lead, four_c // 4, 4)[..., [0, 2, 1, 3]]
    return per_channel.transpose(-1, -2).reshape(*lead, four_c)
