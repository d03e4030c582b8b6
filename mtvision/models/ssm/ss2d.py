"""VMamba's 2D selective scan (SS2D): a feature map scanned as four 1D sequences.

The map is flattened row-major, column-major and both reversed; each direction has its own input
projection to (Δ low-rank, B, C), its own Δ projection, A and D; the four scans are mapped back to
row-major order and summed, then layer-normalised (Liu et al. 2024, "VMamba"; used as is by
MTMamba).  `SS2D` is the full block of VMamba (in-proj, depthwise conv, SiLU, scan, norm, SiLU gate,
out-proj); options drop the gate and out-proj (MTMamba's cross-task block applies its own) or take
Δ, B and C from a second map (MTMamba++'s cross SSM, `forward(x, source)`).  Maps are channels-last:
(batch, H, W, channels).  The constants are VMamba's and the MTMamba releases': d_state 16, expand 2,
dt_rank ceil(d_model / 16), a 3x3 depthwise convolution with bias, SiLU, Δ bias log-uniform in
[1e-3, 0.1], A = -(1..16), D = 1, a LayerNorm on the scan output, no biases in the projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.ssm.selective_scan import selective_scan

DIRECTIONS = 4


def flatten_four_ways(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def merge_four_ways(y: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `flatten_four_ways` summed over directions: (B, 4, D, H*W) -> (B, D, H*W) row-major."""
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    cols = cols.unflatten(-1, (width, height)).transpose(-1, -2).flatten(-2)
    return rows + cols


def dt_bias_init(size: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Mamba's Δ bias: softplus(bias) log-uniform in [dt_min, dt_max] (the inverse softplus of a sample)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class DirectionalScan(nn.Module):
    """The four-direction selective scan of a (B, D, H, W) map with Mamba's parameterisation.

    Per direction k: x_proj_k (D -> dt_rank + 2N, no bias), dt_proj_k (dt_rank -> D, Mamba's
    initialisation), A_k = -exp(A_log_k) with A_log = log(1..N) per channel (S4D-real), D_k = 1.
    """

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int = 1, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        k = DIRECTIONS
        bound = d_inner**-0.5  # nn.Linear's default initialisation
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        std = dt_rank**-0.5
        self.dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank).uniform_(-std, std))
        self.dt_proj_bias = nn.Parameter(torch.stack([dt_bias_init(d_inner, dt_min, dt_max) for _ in range(k)]))
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1)
        self.A_log = nn.Parameter(a_log)
        self.D = nn.Parameter(torch.ones(k * d_inner))
        for p in (self.A_log, self.D, self.dt_proj_bias):
            p._no_weight_decay = True  # as in Mamba

    def forward(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        """Scan `x` (B, D, H, W) with Δ, B, C computed from `source` (default: `x`); -> (B, D, H*W)."""
        b, d, h, w = x.shape
        xs = flatten_four_ways(x)  # (B, 4, D, L)
        src = xs if source is None else flatten_four_ways(source)
        proj = torch.einsum("bkdl,kcd->bkcl", src, self.x_proj_weight)
        dts, Bs, Cs = proj.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_proj_weight)
        y = selective_scan(
            xs.flatten(1, 2),
            dts.flatten(1, 2),
            -torch.exp(self.A_log.float()),
            Bs,
            Cs,
            self.D.float(),
            delta_bias=self.dt_proj_bias.flatten().float(),
            delta_softplus=True,
        )
        return merge_four_ways(y.unflatten(1, (DIRECTIONS, d)), h, w)


class SS2D(nn.Module):
    """VMamba's SS2D block on channels-last maps (B, H, W, in_channels) -> (B, H, W, out).

    Args:
        d_model: model width; the scan runs at d_inner = expand * d_model.
        d_state: SSM state size N (16). expand: 2. d_conv: depthwise kernel (3).
        dt_rank: rank of the Δ projection (None: ceil(d_model / 16)).
        in_channels: input width (default d_model).
        gated: multiply by SiLU(z) from a second half of the in-projection and project back to
            d_model (VMamba/STM); False returns the normalised scan output at d_inner (MTMamba CTM).
        cross: Δ, B and C come from `source` (a (B, H, W, d_model) map, linearly projected to
            d_inner, MTMamba++'s cross SSM); `forward(x, source)`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: float = 2.0,
        d_conv: int = 3,
        dt_rank: int | None = None,
        in_channels: int | None = None,
        gated: bool = True,
        cross: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else int(dt_rank)
        self.gated, self.cross = gated, cross
        in_channels = d_model if in_channels is None else in_channels
        self.in_proj = nn.Linear(in_channels, self.d_inner * (2 if gated else 1), bias=False)
        self.cross_proj = nn.Linear(d_model, self.d_inner, bias=False) if cross else None
        self.conv = nn.Conv2d(self.d_inner, self.d_inner, d_conv, padding=(d_conv - 1) // 2, groups=self.d_inner)
        self.scan = DirectionalScan(self.d_inner, d_state, self.dt_rank)
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False) if gated else None

    def forward(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        return self.forward_projected(self.in_proj(x), source)

    def forward_projected(self, projected: Tensor, source: Tensor | None = None) -> Tensor:
        """The block after its in-projection: `projected` is in_proj(x), (B, H, W, d_inner or
        2 d_inner when gated); for callers that project the input themselves (MTMamba's F-CTM)."""
        if self.cross != (source is not None):
            raise ValueError("a cross SS2D needs a source map, a plain one takes none")
        if self.gated:
            x, z = projected.chunk(2, dim=-1)
        else:
            x, z = projected, None
        x = F.silu(self.conv(x.permute(0, 3, 1, 2)))
        src = None if source is None else self.cross_proj(source).permute(0, 3, 1, 2)
        y = self.scan(x, src)  # (B, d_inner, L)
        y = self.out_norm(y.transpose(1, 2).unflatten(1, x.shape[-2:]))  # (B, H, W, d_inner)
        if not self.gated:
            return y
        return self.out_proj(y * F.silu(z))
