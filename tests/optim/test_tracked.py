"""Gradient-tracking methods (DB-MTL, MoCo, ExcessMTL) against hand computations of their papers'
updates, their defining properties, state round trips and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mtvision.errors import UnknownNameError
from mtvision.optim.tracked import DBMTL, TRACKED, ExcessMTL, MoCo, make_tracker


def grads(seed: int, t: int = 3, p: int = 6) -> torch.Tensor:
    return torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LOSSES = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)


def test_registry_and_did_you_mean():
    assert set(TRACKED) == {"db_mtl", "moco", "excess_mtl"}
    assert isinstance(make_tracker("moco", beta=0.9), MoCo)
    with pytest.raises(UnknownNameError, match="did you mean 'moco'"):
        make_tracker("mocco")


# ---------------------------------------------------------------- DB-MTL


def test_db_mtl_two_steps_by_hand():
    g1, g2 = grads(1), grads(2)
    l1, l2 = LOSSES, torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    method = DBMTL()
    method.combine(g1, l1)
    d, alpha = method.combine(g2, l2)
    lg1, lg2 = g1 / (l1 + 1e-8)[:, None], g2 / (l2 + 1e-8)[:, None]
    b1 = lg1 + 0.9 * (0 - lg1)  # buffer starts at 0: 0.1 g
    b2 = lg2 + 0.9 * (b1 - lg2)
    norms = b2.norm(dim=1)
    want_alpha = norms.max() / (norms + 1e-8)
    torch.testing.assert_close(alpha, want_alpha)
    torch.testing.assert_close(d, want_alpha @ b2)


def test_db_mtl_balances_tracked_gradients_to_the_largest_and_ignores_loss_scales():
    g = grads(3) * torch.tensor([[100.0], [1.0], [0.01]], dtype=torch.float64)
    method = DBMTL()
    d, alpha = method.combine(g, LOSSES)
    raw = method._buffer.norm(dim=1)
    norms = (alpha[:, None] * method._buffer).norm(dim=1)
    # every task scaled to the largest norm (up to the paper's 1e-8 in the denominator)
    torch.testing.assert_close(norms, raw.max() * raw / (raw + 1e-8))
    torch.testing.assert_close(norms, raw.max().expand(3), rtol=1e-4, atol=0)
    # a task's loss times c (its gradient times c too) changes nothing: the log removes loss scales
    c = torch.tensor([1000.0, 1.0, 1e-3], dtype=torch.float64)
    d2, _ = DBMTL().combine(g * c[:, None], LOSSES * c)
    torch.testing.assert_close(d2, d, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- MoCo


def test_moco_two_steps_by_hand():
    g1, g2 = grads(4), grads(5)
    method = MoCo(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.1)
    method.combine(g1, LOSSES)
    d, lam = method.combine(g2, LOSSES)
    y = torch.zeros(3, 6, dtype=torch.float64)
    lam_ref = torch.full((3,), 1 / 3, dtype=torch.float64)
    for k, g in ((1, g1), (2, g2)):
        h = g / (g.norm(dim=1, keepdim=True) + 1e-8) * LOSSES[:, None]
        y = y - 0.5 / k**0.5 * (y - h)
        lam_ref = torch.softmax(lam_ref - 0.1 / k**0.5 * ((y @ y.T + 0.1 * torch.eye(3, dtype=torch.float64)) @ lam_ref), 0)
    torch.testing.assert_close(lam, lam_ref)
    torch.testing.assert_close(d, lam_ref @ y)
    assert lam.sum().item() == pytest.approx(1.0)


def test_moco_tracks_a_constant_gradient_and_its_direction_is_the_tracked_one():
    g = grads(6)
    method = MoCo(beta=1.0, beta_sigma=0.0)  # β = 1: y is exactly the normalised, loss-scaled gradient
    d, lam = method.combine(g, LOSSES)
    h = g / (g.norm(dim=1, keepdim=True) + 1e-8) * LOSSES[:, None]
    torch.testing.assert_close(method._y, h)
    torch.testing.assert_close(d, lam @ h)
    # with β < 1 the tracked gradient converges to a fixed gradient geometrically
    slow = MoCo(beta=0.5, beta_sigma=0.0)
    for _ in range(60):
        slow.combine(g, LOSSES)
    torch.testing.assert_close(slow._y, h, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- ExcessMTL


def test_excess_mtl_two_steps_by_hand():
    g1, g2 = grads(7), grads(8)
    method = ExcessMTL(robust_step_size=0.5)
    d1, w1 = method.combine(g1, LOSSES)
    assert torch.equal(w1, torch.ones(3, dtype=torch.float64))  # the first step records e⁰ only
    torch.testing.assert_close(d1, g1.sum(0))
    d2, w2 = method.combine(g2, LOSSES)
    s1 = g1**2
    e0 = (g1**2 / torch.sqrt(s1 + 1e-7)).sum(1)
    s2 = s1 + g2**2
    e = (g2**2 / torch.sqrt(s2 + 1e-7)).sum(1)
    w = torch.exp(0.5 * e / e0)
    w = w / w.sum() * 3
    torch.testing.assert_close(w2, w)
    torch.testing.assert_close(d2, w @ g2)


def test_excess_mtl_raises_the_weight_of_the_task_farthest_from_its_optimum():
    base = grads(9)
    method = ExcessMTL(robust_step_size=0.1)
    method.combine(base, LOSSES)
    # task 0 keeps a large gradient (large excess risk), the others shrink towards their optimum
    _, w = method.combine(base * torch.tensor([[1.0], [0.1], [0.1]], dtype=torch.float64), LOSSES)
    assert w[0] > 1.0 > w[1] and float(w[1]) == pytest.approx(float(w[2]), rel=0.2) and w.sum().item() == pytest.approx(3.0)


def test_excess_mtl_zero_gradient_keeps_finite_weights():
    g = grads(10)
    g[1] = 0
    method = ExcessMTL()
    for _ in range(3):
        d, w = method.combine(g, LOSSES)
        assert torch.isfinite(d).all() and torch.isfinite(w).all()


# ---------------------------------------------------------------- all of them


@pytest.mark.parametrize("name", sorted(TRACKED))
def test_state_dict_round_trip_reproduces_the_next_direction(name):
    method = make_tracker(name)
    method.combine(grads(11), LOSSES)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in method.state_dict().items()}
    want = [method.combine(grads(s), LOSSES) for s in (12, 13)]
    fresh = make_tracker(name)
    fresh.load_state_dict(state)
    for s, (d, w) in zip((12, 13), want):
        d2, w2 = fresh.combine(grads(s), LOSSES)
        assert torch.equal(d2, d) and torch.equal(w2, w)
    method.reset()
    again = make_tracker(name)
    assert torch.equal(method.combine(grads(11), LOSSES)[0], again.combine(grads(11), LOSSES)[0])


@pytest.mark.parametrize("name", sorted(TRACKED))
def test_one_task_is_its_plain_gradient_and_moves_no_state(name):
    method = make_tracker(name)
    g = grads(14, t=1)
    d, w = method.combine(g, torch.tensor([0.7]))
    assert torch.equal(d, g[0]) and w.tolist() == [1.0]
    assert all(v is None or v == 0 for v in method.state_dict().values())


@pytest.mark.parametrize("name", sorted(TRACKED))
def test_bad_input_is_a_clear_error(name):
    method = make_tracker(name)
    with pytest.raises(ValueError, match="T×P"):
        method.combine(torch.ones(4), LOSSES)
    with pytest.raises(ValueError, match="expected 3 losses"):
        method.combine(grads(0), torch.ones(2))
    method.combine(grads(0), LOSSES)
    with pytest.raises(ValueError, match="different model or task list"):
        method.combine(grads(0, t=3, p=7), LOSSES)


@pytest.mark.parametrize(("cls", "kwargs"), [
    (DBMTL, {"beta": 1.0}), (DBMTL, {"beta_sigma": -1.0}),
    (MoCo, {"beta": 0.0}), (MoCo, {"gamma": 0.0}), (MoCo, {"rho": -1.0}),
    (ExcessMTL, {"robust_step_size": -1.0}), (ExcessMTL, {"robust_step_size": math.inf}),
])
def test_bad_options(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_defaults_are_libmtls():
    assert (DBMTL().beta, DBMTL().beta_sigma) == (0.9, 0.0)
    m = MoCo()
    assert (m.beta, m.beta_sigma, m.gamma, m.gamma_sigma, m.rho) == (0.5, 0.5, 0.1, 0.5, 0.0)
    assert ExcessMTL().robust_step_size == 1e-2
