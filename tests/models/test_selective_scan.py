"""The pure-PyTorch selective scan against the sequential reference (and mamba_ssm when present)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from mtvision.models.ssm.selective_scan import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_recompute,
    selective_scan_reference,
)

ss = importlib.import_module("mtvision.models.ssm.selective_scan")  # the module (the package exports the function)


def _inputs(b=2, d=6, n=4, L=37, groups=None, dtype=torch.float64, seed=0, bc_dims=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, delta, z = r(b, d, L), r(b, d, L) * 0.5 - 1.0, r(b, d, L)
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 4 * scale - 0.1
    if bc_dims == 2:
        B, C = r(d, n), r(d, n)
    elif groups is None:
        B, C = r(b, n, L), r(b, n, L)
    else:
        B, C = r(b, groups, n, L), r(b, groups, n, L)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=r(d), z=z, delta_bias=r(d) * 0.1)


def _close(a, b, tol):
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


@pytest.mark.parametrize("L, chunk", [(37, 8), (64, 16), (1, 8), (5, 64), (40, 1)])
def test_chunked_equals_reference_including_last_state(L, chunk):
    x = _inputs(L=L)
    ref, h_ref = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    out, h = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, chunk_size=chunk)
    assert out.shape == (2, 6, L) and out.dtype == torch.float64
    _close(out, ref, 1e-10)
    _close(h, h_ref, 1e-10)


@pytest.mark.parametrize("bc_dims, groups", [(2, None), (3, None), (4, 3), (4, 1)])
def test_input_independent_and_grouped_B_C(bc_dims, groups):
    x = _inputs(bc_dims=bc_dims, groups=groups)
    _close(selective_scan_chunked(**x, chunk_size=8), selective_scan_reference(**x), 1e-10)
    if groups == 3:  # channel d reads group d // 2: explicit per-channel expansion gives the same
        per_channel = {**x, "B": x["B"].repeat_interleave(2, 1), "C": x["C"].repeat_interleave(2, 1)}
        _close(selective_scan_reference(**per_channel), selective_scan_reference(**x), 1e-12)


def test_reference_matches_the_recurrence_written_out():
    x = _inputs(b=1, d=1, n=2, L=3)
    u, dt, A, B, C, D = (x[k][0] if x[k].dim() == 3 else x[k] for k in ("u", "delta", "A", "B", "C", "D"))
    h = torch.zeros(2, dtype=torch.float64)
    ys = []
    for i in range(3):
        h = torch.exp(dt[0, i] * A[0]) * h + dt[0, i] * B[:, i] * u[0, i]
        ys.append((C[:, i] * h).sum() + D[0] * u[0, i])
    out = selective_scan_reference(x["u"], x["delta"], A, x["B"], x["C"], D)
    _close(out[0, 0], torch.stack(ys), 1e-12)


def test_z_gating_softplus_and_bias_semantics():
    x = _inputs()
    plain = selective_scan_reference(
        x["u"], F.softplus(x["delta"] + x["delta_bias"][:, None]), x["A"], x["B"], x["C"], x["D"]
    )
    both = selective_scan_chunked(**x, delta_softplus=True, chunk_size=16)
    _close(both, plain * F.silu(x["z"]), 1e-10)
    no_z = {**x, "z": None}
    _close(selective_scan_chunked(**no_z, chunk_size=16), selective_scan_reference(**no_z), 1e-10)


def test_gradients_match_reference_float64():
    x = _inputs(b=1, d=3, n=3, L=11, groups=3)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    grads = []
    for fn in (selective_scan_reference, lambda **k: selective_scan_chunked(**k, chunk_size=4)):
        leaves = {k: x[k].clone().requires_grad_() for k in names}
        out = fn(**leaves, delta_softplus=True)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        grads.append(torch.autograd.grad((out * weight).sum(), [leaves[k] for k in names]))
    for name, g_ref, g in zip(names, *grads):
        assert torch.allclose(g, g_ref, atol=1e-9, rtol=1e-9), name


def test_gradcheck_on_tiny_sizes():
    x = _inputs(b=1, d=2, n=2, L=6)
    leaves = [x[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C")]

    def fn(u, delta, A, B, C):
        return selective_scan_chunked(u, delta, A, B, C, x["D"], delta_softplus=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_float32_long_sequence_and_gradients():
    x = _inputs(b=1, d=8, n=16, L=1024, dtype=torch.float32, seed=1)
    x["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(8, 1)  # Mamba's S4D-real initialisation
    leaves = [{k: v.clone().requires_grad_() for k, v in x.items()} for _ in range(2)]
    ref = selective_scan_reference(**leaves[0], delta_softplus=True)
    out = selective_scan_chunked(**leaves[1], delta_softplus=True)
    scale = ref.abs().max()
    assert (out - ref).abs().max() < 2e-5 * scale
    ref.square().mean().backward()
    out.square().mean().backward()
    for k in ("u", "delta", "B", "A"):
        g_ref, g = leaves[0][k].grad, leaves[1][k].grad
        assert (g - g_ref).abs().max() < 1e-4 * g_ref.abs().max(), k


def test_strong_decays_stay_finite_and_exact():
    """Decays of e^-400 per step would overflow a naive log-space cumsum; here they shorten chunks."""
    x = _inputs(L=50, scale=25.0)
    x["delta"] = x["delta"] + 4.0  # softplus(~3.5) * |A| up to 100 per step
    ref = selective_scan_reference(**x, delta_softplus=True)
    out = selective_scan_chunked(**x, delta_softplus=True, chunk_size=64)
    assert torch.isfinite(out).all()
    _close(out, ref, 1e-9)


def test_bf16_inputs_compute_in_float32():
    x = _inputs(dtype=torch.float32)
    x16 = {k: v.bfloat16() for k, v in x.items()}
    out = selective_scan_chunked(**x16, delta_softplus=True, chunk_size=16)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_reference(**{k: v.float() for k, v in x16.items()}, delta_softplus=True)
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()


def test_checkpointed_blocks_give_the_same_values_and_gradients(monkeypatch):
    x = _inputs(d=7, L=20)
    monkeypatch.setattr(ss, "BLOCK_ELEMENTS", 2 * 20 * 4 * 2)  # a few channels per block
    results = []
    for ckpt in (False, True):
        u = x["u"].clone().requires_grad_()
        out = selective_scan_chunked(**{**x, "u": u}, chunk_size=8, checkpoint=ckpt)
        (g,) = torch.autograd.grad(out.square().sum(), u)
        results.append((out, g))
    _close(results[0][0], results[1][0], 1e-12)
    _close(results[0][1], results[1][1], 1e-12)
    _close(results[0][0], selective_scan_reference(**x), 1e-10)


def test_dispatch_uses_pure_version_without_cuda():
    x = _inputs()
    _close(selective_scan(**x, delta_softplus=True), selective_scan_chunked(**x, delta_softplus=True), 1e-12)


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def _values_and_grads(fn, x, **options):
    """Outputs, last state and the gradients of a fixed weighting of both w.r.t. every input of `x`."""
    names = [k for k in NAMES if k in x]
    leaves = {k: (v.clone().requires_grad_() if k in names else v) for k, v in x.items()}
    y, h = fn(**leaves, return_last_state=True, **options)
    wy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y).to(y.dtype)
    wh = torch.linspace(1, -0.5, h.numel(), dtype=torch.float64).view_as(h).to(h.dtype)
    grads = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), [leaves[k] for k in names])
    return y, h, dict(zip(names, grads))


def _assert_same(x, tol, options, chunk_size):
    ref = _values_and_grads(selective_scan_reference, x, **options)
    new = _values_and_grads(lambda **k: selective_scan_recompute(**k, chunk_size=chunk_size), x, **options)
    _close(new[0], ref[0], tol)
    _close(new[1], ref[1], tol)
    for name in ref[2]:
        assert torch.allclose(new[2][name], ref[2][name], atol=tol, rtol=tol), (name, (new[2][name] - ref[2][name]).abs().max().item())


@pytest.mark.parametrize("bc_dims, groups", [(2, None), (3, None), (4, 3), (4, 1)])
@pytest.mark.parametrize("L, chunk", [(37, 8), (32, 8), (1, 8), (5, 64), (9, 1)])
def test_recompute_values_last_state_and_all_gradients_equal_reference(bc_dims, groups, L, chunk):
    x = _inputs(L=L, bc_dims=bc_dims, groups=groups)
    _assert_same(x, 1e-10, dict(delta_softplus=True), chunk)


def test_recompute_without_optional_inputs_and_with_negative_or_growing_steps():
    """No D, z or bias; Δ < 0 and A > 0 take the non-monotone branch (growth within the bounds)."""
    x = {k: v for k, v in _inputs(L=23).items() if k not in ("D", "z", "delta_bias")}
    _assert_same(x, 1e-10, {}, 8)  # raw Δ has negative entries
    x["A"] = x["A"].abs() * 0.2
    x["delta"] = x["delta"].abs() * 0.5
    _assert_same(x, 1e-10, {}, 8)


def test_recompute_strong_decays_shorten_chunks_and_stay_exact():
    x = _inputs(L=50, scale=25.0)
    x["delta"] = x["delta"] + 4.0  # softplus(~3.5) * |A| up to 100 per step: chunks shrink to 1-2 positions
    _assert_same(x, 1e-9, dict(delta_softplus=True), 64)
    x32 = {k: v.float() for k, v in x.items()}
    ref = _values_and_grads(selective_scan_reference, x32, delta_softplus=True)
    new = _values_and_grads(selective_scan_recompute, x32, delta_softplus=True)
    assert all(torch.isfinite(t).all() for t in (new[0], new[1], *new[2].values()))
    assert (new[0] - ref[0]).abs().max() < 1e-5 * ref[0].abs().max()
    for name in NAMES:
        assert (new[2][name] - ref[2][name]).abs().max() < 1e-4 * ref[2][name].abs().max(), name


@pytest.mark.parametrize("bc_dims, groups", [(2, None), (3, None), (4, 2)])
def test_recompute_gradcheck_all_inputs_float64(bc_dims, groups):
    x = _inputs(b=2, d=4, n=2, L=7, bc_dims=bc_dims, groups=groups)
    leaves = [x[k].clone().requires_grad_() for k in NAMES]

    def fn(*args):
        y, h = selective_scan_recompute(*args[:7], delta_bias=args[7], delta_softplus=True, return_last_state=True, chunk_size=2)
        return y, h

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_recompute_float32_long_sequence_matches_reference_and_old_chunked():
    x = _inputs(b=1, d=8, n=16, L=1000, dtype=torch.float32, seed=1, groups=2)  # L not a multiple of 64
    x["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(8, 1)  # Mamba's S4D-real initialisation
    ref = _values_and_grads(selective_scan_reference, x, delta_softplus=True)
    old = _values_and_grads(selective_scan_chunked, x, delta_softplus=True)
    new = _values_and_grads(selective_scan_recompute, x, delta_softplus=True)
    assert (new[0] - ref[0]).abs().max() < 2e-5 * ref[0].abs().max()
    assert (new[1] - ref[1]).abs().max() < 2e-5 * ref[1].abs().max()
    assert (new[0] - old[0]).abs().max() < 1e-6 * ref[0].abs().max()  # the same arithmetic as the old form
    for name in NAMES:
        assert (new[2][name] - ref[2][name]).abs().max() < 1e-4 * ref[2][name].abs().max(), name
        assert (new[2][name] - old[2][name]).abs().max() < 1e-5 * ref[2][name].abs().max(), name


@pytest.mark.parametrize("groups", [None, 3])
def test_recompute_channel_blocks_inside_groups_give_the_same_results(monkeypatch, groups):
    x = _inputs(d=12, L=20, groups=groups)
    monkeypatch.setattr(ss, "BLOCK_ELEMENTS", 3 * 2 * (20 + 8) * 4)  # 3 channels: blocks cross group ends (4)
    blocks = ss._channel_blocks(2, 12, 20, 4, 8, 4 if groups else 12)
    assert all(b.stop - b.start <= 3 and b.start // 4 == (b.stop - 1) // 4 for b in blocks) == bool(groups)
    _assert_same(x, 1e-10, dict(delta_softplus=True), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_keeps_only_its_inputs_and_the_entering_states(dtype):
    """For the backward autograd keeps the inputs as given and the (B, D, N, L / T) entering states:
    no tensor of B·D·N·L elements, and no float32 copy of bf16 inputs (the old form keeps both)."""
    b, d, n, L = 2, 8, 16, 256
    x = {k: v.to(dtype) for k, v in _inputs(b=b, d=d, n=n, L=L, dtype=torch.float32, groups=2).items()}
    for fn, old in ((selective_scan_recompute, False), (selective_scan_chunked, True)):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        saved = {}

        def pack(t, saved=saved):
            saved[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(**leaves, delta_softplus=True, chunk_size=64)
        inputs = sum(v.numel() * v.element_size() for v in leaves.values())
        entering = b * d * n * (L // 64) * 4  # float32
        assert (max(saved.values()) >= b * d * n * L * 4) == old, fn.__name__
        assert (sum(saved.values()) <= inputs + entering) != old, fn.__name__
        y.float().sum().backward()  # the graph is still usable


def test_recompute_partial_gradients_bf16_and_no_grad():
    x = _inputs(dtype=torch.float32)
    u = x["u"].clone().requires_grad_()
    out = selective_scan_recompute(**{**x, "u": u}, delta_softplus=True, chunk_size=8)
    (g,) = torch.autograd.grad(out.square().sum(), u)
    ref_u = x["u"].clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(selective_scan_reference(**{**x, "u": ref_u}, delta_softplus=True).square().sum(), ref_u)
    assert (g - g_ref).abs().max() < 1e-4 * g_ref.abs().max()
    x16 = {k: v.bfloat16().requires_grad_() for k, v in x.items()}
    out16 = selective_scan_recompute(**x16, delta_softplus=True, chunk_size=16)
    assert out16.dtype == torch.bfloat16
    out16.float().sum().backward()
    assert all(v.grad.dtype == torch.bfloat16 and torch.isfinite(v.grad.float()).all() for v in x16.values())
    with torch.no_grad():
        _close(selective_scan_recompute(**x, delta_softplus=True, chunk_size=8), selective_scan_reference(**x, delta_softplus=True), 2e-5)


def test_dispatch_uses_the_memory_bounded_scan_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(ss, "selective_scan_recompute", lambda *a, **k: calls.append(1) or selective_scan_reference(*a, **k))
    x = _inputs()
    selective_scan(**x, delta_softplus=True)
    assert calls == [1]


@pytest.mark.skipif(not (ss.HAS_MAMBA_SSM and torch.cuda.is_available()), reason="needs mamba_ssm and CUDA")
def test_matches_mamba_ssm_kernel():
    x = {k: v.float().cuda() for k, v in _inputs(d=16, n=16, L=300, groups=2).items()}
    out = selective_scan(**x, delta_softplus=True)
    pure = selective_scan_chunked(**x, delta_softplus=True)
    assert (out - pure).abs().max() < 1e-3 * pure.abs().max()
