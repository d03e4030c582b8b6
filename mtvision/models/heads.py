"""The shared multi-scale neck (FPN-style fusion) and the per-task prediction heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("bn", "gn")


def make_norm(kind: str, channels: int) -> nn.Module:
    """'bn': BatchNorm2d; 'gn': GroupNorm with 32 groups (fewer when `channels` needs), which keeps
    no batch statistics, so results do not depend on how a batch is split across steps or GPUs."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r} (valid: {', '.join(NORMS)})")


class ConvBNReLU(nn.Sequential):
    """k x k convolution (no bias), normalisation (batch norm by default), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: str = "bn"):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of an N x C x H x W map to `size` (no-op when it already has that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class MultiScaleNeck(nn.Module):
    """Feature pyramid fusion of backbone levels into one map at the finest level's resolution.

    Lateral 1x1 projections to `channels`, a top-down pathway (coarser level upsampled and added),
    a 3x3 smoothing convolution per level, then every level upsampled to the finest resolution,
    summed and fused by a 3x3 convolution (the FPN of Lin et al. 2017 with the panoptic-FPN style
    merge).  Levels may share a stride (plain ViTs).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int = 128, norm: str = "bn"):
        super().__init__()
        if len(in_channels) != len(strides) or not in_channels:
            raise ValueError("in_channels and strides must be non-empty and of equal length")
        if list(strides) != sorted(strides):
            raise ValueError(f"levels must be ordered from fine to coarse, got strides {list(strides)}")
        self.in_channels = list(in_channels)
        self.strides = list(strides)
        self.channels = channels
        self.stride = min(strides)
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), make_norm(norm, channels)) for c in in_channels
        )
        self.smooth = nn.ModuleList(ConvBNReLU(channels, channels, norm=norm) for _ in in_channels)
        self.fuse = ConvBNReLU(channels, channels, norm=norm)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """List of N x C_i x H_i x W_i maps (fine to coarse) -> N x channels x H_0 x W_0."""
        if len(features) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature levels, got {len(features)}")
        laterals = [proj(f) for proj, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + resize_to(laterals[i + 1], laterals[i].shape[-2:])
        size = laterals[0].shape[-2:]
        fused = sum(resize_to(smooth(p), size) for smooth, p in zip(self.smooth, laterals))
        return self.fuse(fused)


class TaskHead(nn.Module):
    """A task's prediction head: 3x3 conv-BN-ReLU then a 1x1 convolution to the task's channels."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, norm: str = "bn"):
        super().__init__()
        self.body = ConvBNReLU(in_channels, hidden_channels, norm=norm)
        self.out = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))
