"""SS2D (VMamba's 2D selective scan, as the MTMamba releases use it): scan geometry against four
reference scans, the releases' constants and initialisation, the gate-free and cross forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtvision.models.ssm.selective_scan import selective_scan_reference
from mtvision.models.ssm.ss2d import SS2D, DirectionalScan, flatten_four_ways, merge_four_ways


def test_four_way_flatten_orders_and_merge():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    seqs = flatten_four_ways(x)[0, :, 0]
    assert seqs[0].tolist() == [0, 1, 2, 3, 4, 5]  # row-major
    assert seqs[1].tolist() == [0, 3, 1, 4, 2, 5]  # column-major
    assert seqs[2].tolist() == [5, 4, 3, 2, 1, 0] and seqs[3].tolist() == [5, 2, 4, 1, 3, 0]
    assert torch.equal(merge_four_ways(flatten_four_ways(x), 2, 3), 4 * x.flatten(2))


def test_directional_scan_equals_four_reference_scans():
    torch.manual_seed(0)
    scan = DirectionalScan(d_inner=4, d_state=3, dt_rank=2).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    seqs = flatten_four_ways(x)
    proj = torch.einsum("bkdl,kcd->bkcl", seqs, scan.x_proj_weight)
    ys = []
    for k in range(4):
        dt, B, C = proj[:, k].split([2, 3, 3], dim=1)
        rows = slice(4 * k, 4 * k + 4)
        ys.append(
            selective_scan_reference(
                seqs[:, k], scan.dt_proj_weight[k] @ dt, -torch.exp(scan.A_log[rows]), B, C, scan.D[rows],
                delta_bias=scan.dt_proj_bias[k], delta_softplus=True,
            )
        )  # fmt: skip
    expected = merge_four_ways(torch.stack(ys, 1), 3, 5)
    assert torch.allclose(scan(x), expected, atol=1e-10)


def test_scan_of_transposed_map_with_swapped_directions_is_transposed():
    torch.manual_seed(0)
    scan = DirectionalScan(d_inner=3, d_state=4, dt_rank=1).double()
    swapped = DirectionalScan(d_inner=3, d_state=4, dt_rank=1).double()
    order = [1, 0, 3, 2]  # row-major <-> column-major
    with torch.no_grad():
        for name in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias"):
            getattr(swapped, name).copy_(getattr(scan, name)[order])
        for name in ("A_log", "D"):
            getattr(swapped, name).copy_(getattr(scan, name).view(4, 3, -1)[order].reshape_as(getattr(scan, name)))
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    y = scan(x).view(1, 3, 4, 6)
    y_t = swapped(x.transpose(2, 3)).view(1, 3, 6, 4)
    assert torch.allclose(y_t, y.transpose(2, 3), atol=1e-10)


@pytest.mark.parametrize("width", [192, 384, 768])
def test_the_releases_constants_and_initialisation(width):
    torch.manual_seed(0)
    block = SS2D(width)
    d_inner = 2 * width
    assert block.d_inner == d_inner and block.dt_rank == math.ceil(width / 16) and block.scan.d_state == 16
    assert block.in_proj.bias is None and block.out_proj.bias is None and block.cross_proj is None
    assert block.in_proj.weight.shape == (2 * d_inner, width)  # x and the gate z
    assert block.conv.kernel_size == (3, 3) and block.conv.groups == d_inner and block.conv.bias is not None
    assert isinstance(block.out_norm, torch.nn.LayerNorm) and block.out_norm.eps == 1e-5
    a = torch.exp(block.scan.A_log)
    assert block.scan.A_log.shape == (4 * d_inner, 16)
    assert torch.allclose(a, torch.arange(1, 17.0).expand_as(a))
    assert torch.equal(block.scan.D, torch.ones(4 * d_inner))
    dt = F.softplus(block.scan.dt_proj_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert block.scan.x_proj_weight.shape == (4, block.dt_rank + 32, d_inner)
    assert block.scan.x_proj_weight.abs().max() <= d_inner**-0.5  # nn.Linear's default bound
    assert block.scan.dt_proj_weight.abs().max() <= block.dt_rank**-0.5


def test_forward_is_the_projected_forward_of_the_in_projection():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 6, 8)
    for block in (SS2D(8, d_state=4).eval(), SS2D(8, d_state=4, gated=False, in_channels=24).eval()):
        inp = x if block.in_proj.in_features == 8 else torch.cat([x, 2 * x, -x], -1)
        with torch.no_grad():
            assert torch.equal(block(inp), block.forward_projected(block.in_proj(inp)))
    ungated = SS2D(8, d_state=4, gated=False, in_channels=24)
    assert ungated.out_proj is None and ungated.in_proj.weight.shape == (16, 24)  # MTMamba's F-CTM shared SS2D
    with torch.no_grad():
        y = ungated(torch.randn(1, 5, 6, 24))
    assert y.shape == (1, 5, 6, 16)  # the normalised scan at d_inner: zero mean over channels
    assert torch.allclose(((y - ungated.out_norm.bias) / ungated.out_norm.weight).mean(-1), torch.zeros(1, 5, 6), atol=1e-5)


def test_cross_ss2d_reads_delta_b_c_from_the_source():
    torch.manual_seed(0)
    block = SS2D(8, d_state=4, cross=True).eval()
    assert block.cross_proj.weight.shape == (16, 8) and block.cross_proj.bias is None
    x, src = torch.randn(1, 5, 6, 8), torch.randn(1, 5, 6, 8)
    y = block(x, src)
    assert not torch.allclose(y, block(x, src + torch.randn_like(src)))
    # the scanned input u is the task's own feature: its gradient reaches x and the source
    x.requires_grad_(True)
    src.requires_grad_(True)
    gx, gs = torch.autograd.grad(block(x, src).sum(), [x, src])
    assert gx.abs().sum() > 0 and gs.abs().sum() > 0
    with pytest.raises(ValueError, match="source"):
        block(x)
