"""Loss weighting: hand-computed weights per method, state round-trips, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mtvision.errors import MTVisionError, UnknownNameError
from mtvision.optim.weighting import (
    FAMO,
    IGB,
    WEIGHTINGS,
    DynamicWeightAverage,
    EqualWeighting,
    FixedWeighting,
    GeometricLossStrategy,
    GradNorm,
    LogLossWeighting,
    LossWeightingError,
    RandomLossWeighting,
    UncertaintyWeighting,
    make_weighting,
)

TASKS = ["semseg", "depth"]


def L(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------- simple methods


def test_equal_weighting_sums_and_reports_ones() -> None:
    total, w = EqualWeighting(TASKS)(L(semseg=2.0, depth=0.5), step=0)
    assert float(total.detach()) == pytest.approx(2.5)
    assert w == {"semseg": 1.0, "depth": 1.0}


def test_fixed_weighting_uses_given_weights_and_rejects_unknown_tasks() -> None:
    total, w = FixedWeighting(TASKS, weights={"depth": 3.0})(L(semseg=2.0, depth=0.5), step=0)
    assert float(total.detach()) == pytest.approx(2.0 + 1.5)
    assert w == {"semseg": 1.0, "depth": 3.0}
    with pytest.raises(LossWeightingError, match="normal"):
        FixedWeighting(TASKS, weights={"normal": 2.0})


def test_gls_value_and_gradient() -> None:
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    gls = GeometricLossStrategy(["a", "b", "c"])
    total, w = gls({"a": a, "b": b, "c": c}, step=0)
    assert float(total.detach()) == pytest.approx(2.0)  # (2 * 8 * 0.5) ** (1/3) = 8 ** (1/3)
    total.backward()
    # dL/dL_t = L / (T L_t) = 2 / (3 L_t)
    assert float(a.grad) == pytest.approx(2 / 6)
    assert float(b.grad) == pytest.approx(2 / 24)
    assert float(c.grad) == pytest.approx(2 / 1.5)
    assert w == pytest.approx({"a": 2 / 6, "b": 2 / 24, "c": 2 / 1.5})


def test_log_weighting_value_gradient_and_weights() -> None:
    # the MTMamba releases' `log` scheme: sum_t w_t log(L_t + 1e-8), unit weights by default
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    total, w = LogLossWeighting(["a", "b"])({"a": a, "b": b}, step=0)
    assert float(total.detach()) == pytest.approx(math.log(2.0 + 1e-8) + math.log(0.25 + 1e-8), abs=1e-12)
    total.backward()
    assert float(a.grad) == pytest.approx(1 / (2.0 + 1e-8)) and float(b.grad) == pytest.approx(1 / (0.25 + 1e-8))
    assert w == pytest.approx({"a": 0.5, "b": 4.0})
    weighted, w = LogLossWeighting(["a", "b"], weights={"b": 3.0})(L(a=2.0, b=0.25), step=0)
    assert float(weighted) == pytest.approx(math.log(2.0) + 3.0 * math.log(0.25), rel=1e-7)
    assert w == pytest.approx({"a": 0.5, "b": 12.0})
    # a zero loss stays finite (the release's epsilon), a loss scale only shifts the total
    zero, _ = LogLossWeighting(["a"])({"a": torch.tensor(0.0, dtype=torch.float64)}, step=0)
    assert float(zero) == pytest.approx(math.log(1e-8))
    with pytest.raises(LossWeightingError, match="unknown tasks"):
        LogLossWeighting(["a", "b"], weights={"c": 1.0})


def test_log_weighting_gradient_is_invariant_to_a_loss_scale() -> None:
    # why per-rank losses normalised by a global pixel count give the release's per-GPU gradient
    W = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    grads = []
    for scale in (1.0, 0.125):
        loss = ((W - torch.tensor([2.0, 1.0], dtype=torch.float64)) ** 2).sum() * scale
        total, _ = LogLossWeighting(["a"])({"a": loss}, step=0)
        grads.append(torch.autograd.grad(total, W)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6)


# ---------------------------------------------------------------- UW


def test_uw_combined_loss_and_weights() -> None:
    uw = UncertaintyWeighting(TASKS, classification=["semseg"])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([math.log(2.0), math.log(0.5)]))
    total, w = uw(L(semseg=3.0, depth=1.0), step=0)
    # classification: exp(-s) L + s/2 = 3/2 + log(2)/2 ; regression: exp(-s) L / 2 + s/2 = 1 + log(0.5)/2
    assert float(total.detach()) == pytest.approx(1.5 + math.log(2) / 2 + 1.0 + math.log(0.5) / 2, rel=1e-6)
    assert w == pytest.approx({"semseg": 0.5, "depth": 1.0}, rel=1e-6)
    assert uw.extra_parameters() == [uw.log_vars]


def test_uw_optimum_is_sigma2_equal_to_loss() -> None:
    """Regression form: ∂/∂s [½ e^{-s} L + ½ s] = 0 at s = log L (σ² = L); classification: at σ² = 2L."""
    uw = UncertaintyWeighting(["a", "b"], classification=["b"])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([math.log(0.7), math.log(2 * 1.3)]))
    total, _ = uw(L(a=0.7, b=1.3), step=0)
    total.backward()
    assert uw.log_vars.grad.abs().max() < 1e-6
    # and gradient descent from s = 0 converges there
    uw = UncertaintyWeighting(["a"])
    opt = torch.optim.SGD(uw.extra_parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        uw(L(a=0.7), step=0)[0].backward()
        opt.step()
    assert float(uw.log_vars.detach()[0].exp()) == pytest.approx(0.7, rel=1e-4)


# ---------------------------------------------------------------- DWA


def test_dwa_over_three_epochs() -> None:
    dwa = DynamicWeightAverage(TASKS)
    # epoch 1: averages (2, 4); weights 1
    for loss in [(1.0, 3.0), (3.0, 5.0)]:
        _, w = dwa(L(semseg=loss[0], depth=loss[1]), step=0)
        assert w == {"semseg": 1.0, "depth": 1.0}
    dwa.end_epoch()
    # epoch 2: averages (1, 3.6); still weights 1
    for loss in [(0.5, 3.0), (1.5, 4.2)]:
        total, w = dwa(L(semseg=loss[0], depth=loss[1]), step=0)
        assert w == {"semseg": 1.0, "depth": 1.0}
    dwa.end_epoch()
    # epoch 3: r = (1/2, 3.6/4) = (0.5, 0.9); w = 2 softmax(r / 2)
    expected = [2 * v for v in softmax([0.25, 0.45])]
    total, w = dwa(L(semseg=1.0, depth=2.0), step=0)
    assert [w["semseg"], w["depth"]] == pytest.approx(expected, rel=1e-6)
    assert float(total.detach()) == pytest.approx(expected[0] * 1.0 + expected[1] * 2.0, rel=1e-6)
    assert expected[1] > expected[0]  # the slower task gets more weight
    dwa.end_epoch()
    # epoch 4 uses epoch 3 / epoch 2: r = (1/1, 2/3.6)
    _, w = dwa(L(semseg=1.0, depth=1.0), step=0)
    assert [w["semseg"], w["depth"]] == pytest.approx([2 * v for v in softmax([0.5, 1 / 3.6])], rel=1e-6)


def test_dwa_end_epoch_with_given_averages() -> None:
    dwa = DynamicWeightAverage(TASKS, temperature=1.0)
    dwa(L(semseg=100.0, depth=100.0), step=0)  # ignored: averages are supplied
    dwa.end_epoch({"semseg": 2.0, "depth": 1.0})
    dwa.end_epoch({"semseg": 1.0, "depth": 1.0})
    _, w = dwa(L(semseg=1.0, depth=1.0), step=0)
    assert [w["semseg"], w["depth"]] == pytest.approx([2 * v for v in softmax([0.5, 1.0])], rel=1e-6)
    with pytest.raises(LossWeightingError, match="normal"):
        dwa.end_epoch({"semseg": 1.0, "normal": 1.0})


# ---------------------------------------------------------------- RLW


def test_rlw_matches_manual_softmax_of_seeded_normals() -> None:
    rlw = RandomLossWeighting(["a", "b", "c"], seed=7)
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        expected = torch.softmax(torch.randn(3, generator=g), dim=0).tolist()
        # two micro-batches of one step share the draw
        for _ in range(2):
            total, w = rlw(L(a=1.0, b=2.0, c=4.0), step=step)
            assert list(w.values()) == pytest.approx(expected, rel=1e-6)
            assert float(total.detach()) == pytest.approx(expected[0] + 2 * expected[1] + 4 * expected[2], rel=1e-6)
    assert sum(w.values()) == pytest.approx(1.0)


# ---------------------------------------------------------------- GradNorm


def _gradnorm_problem(w_shared: list[float]) -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    """h = W·x (x = (3, 4)); task 1: (2h − 0)², task 2: (−h − 1)²."""
    W = torch.nn.Parameter(torch.tensor(w_shared, dtype=torch.float64))
    h = W @ torch.tensor([3.0, 4.0], dtype=torch.float64)
    return W, {"a": (2 * h - 0.0) ** 2, "b": (-h - 1.0) ** 2}


def test_gradnorm_one_update_against_manual_computation() -> None:
    gn = GradNorm(["a", "b"], alpha=1.5)
    opt = torch.optim.SGD(gn.extra_parameters(), lr=0.1)
    # step 0 at W0 = (0.1, 0.1): h = 0.7, L(0) = (1.96, 2.89); r = 1, so the target is mean(G)
    W, losses = _gradnorm_problem([0.1, 0.1])
    total, w = gn(losses, step=0, shared=[W])
    assert w == {"a": 1.0, "b": 1.0}
    # ∇_W L_a = 2(2h)(2)x = 8h x, |.| = 8·0.7·5 = 28; ∇_W L_b = 2(−h−1)(−1)x = 2(h+1)x, |.| = 2·1.7·5 = 17
    # L_grad = |28 − 22.5| + |17 − 22.5| = 11
    assert float(total.detach()) == pytest.approx(1.96 + 2.89 + 11.0)
    opt.zero_grad()
    total.backward()
    # ∂L_grad/∂w_a = sign(28 − 22.5)·28 = 28, ∂/∂w_b = −17 (the target is a constant)
    assert gn.weights.grad.tolist() == pytest.approx([28.0, -17.0])
    assert W.grad.tolist() == pytest.approx([(8 * 0.7 + 2 * 1.7) * 3, (8 * 0.7 + 2 * 1.7) * 4])
    opt.step()
    gn.after_step(None)
    # w = (1 − 2.8, 1 + 1.7) = (−1.8, 2.7) -> clamped (0, 2.7) -> renormalised to sum 2: (0, 2)
    assert gn.weights.tolist() == pytest.approx([0.0, 2.0])

    # a fresh run with a small lr, then a step with r != 1
    gn = GradNorm(["a", "b"], alpha=1.5)
    opt = torch.optim.SGD(gn.extra_parameters(), lr=0.01)
    W, losses = _gradnorm_problem([0.1, 0.1])
    opt.zero_grad()
    gn(losses, step=0, shared=[W])[0].backward()
    opt.step()
    gn.after_step(None)
    w1 = [1 - 0.28, 1 + 0.17]
    w1 = [2 * v / sum(w1) for v in w1]
    assert gn.weights.tolist() == pytest.approx(w1)
    # step 1 at W1 = (0.05, 0.05): h = 0.35, L = (0.49, 1.8225)
    W, losses = _gradnorm_problem([0.05, 0.05])
    opt.zero_grad()
    total, w = gn(losses, step=1, shared=[W])
    assert [w["a"], w["b"]] == pytest.approx(w1, rel=1e-6)
    n = [8 * 0.35 * 5, 2 * 1.35 * 5]  # 14, 13.5
    G = [w1[0] * n[0], w1[1] * n[1]]
    Lt = [0.49 / 1.96, 1.8225 / 2.89]
    r = [v / (sum(Lt) / 2) for v in Lt]
    target = [sum(G) / 2 * ri**1.5 for ri in r]
    l_grad = abs(G[0] - target[0]) + abs(G[1] - target[1])
    assert float(total.detach()) == pytest.approx(w1[0] * 0.49 + w1[1] * 1.8225 + l_grad, rel=1e-6)
    total.backward()
    grad = [math.copysign(n[i], G[i] - target[i]) for i in range(2)]
    assert gn.weights.grad.tolist() == pytest.approx(grad, rel=1e-6)
    opt.step()
    gn.after_step(None)
    w2 = [w1[i] - 0.01 * grad[i] for i in range(2)]
    w2 = [2 * v / sum(w2) for v in w2]
    assert gn.weights.tolist() == pytest.approx(w2, rel=1e-6)
    assert sum(gn.weights.tolist()) == pytest.approx(2.0)
    assert w2[0] < w1[0]  # task a trains faster (smaller L̃): its gradient norm is above target, its weight drops
    # back at W0 the losses equal L(0) again: r = 1 and the target is mean(G) (L(0) is kept from step 0)
    W, losses = _gradnorm_problem([0.1, 0.1])
    total, _ = gn(losses, step=2, shared=[W])
    G = [w2[0] * 28.0, w2[1] * 17.0]
    l_grad = abs(G[0] - sum(G) / 2) + abs(G[1] - sum(G) / 2)
    assert float(total.detach()) == pytest.approx(w2[0] * 1.96 + w2[1] * 2.89 + l_grad, rel=1e-6)


def test_gradnorm_needs_shared() -> None:
    gn = GradNorm(TASKS)
    assert gn.needs_shared_grads
    W, losses = _gradnorm_problem([0.1, 0.1])
    with pytest.raises(LossWeightingError, match="shared"):
        gn({"semseg": losses["a"], "depth": losses["b"]}, step=0)


# ---------------------------------------------------------------- FAMO


def _adam_step(x: list[float], g: list[float], m: list[float], v: list[float], t: int, lr: float, wd: float):
    g = [gi + wd * xi for gi, xi in zip(g, x)]
    m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
    v = [0.999 * vi + 0.001 * gi * gi for vi, gi in zip(v, g)]
    mh = [mi / (1 - 0.9**t) for mi in m]
    vh = [vi / (1 - 0.999**t) for vi in v]
    x = [xi - lr * a / (math.sqrt(b) + 1e-8) for xi, a, b in zip(x, mh, vh)]
    return x, m, v


def test_famo_loss_weights_and_logit_updates_against_manual_computation() -> None:
    famo = FAMO(["a", "b"])
    assert famo.extra_parameters() == []
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    total, w = famo({"a": a, "b": b}, step=0)
    # z = (1/2, 1/2), c = 1/4 + 1/2 = 3/4; total = Σ z/c log L = (2/3)(log 2 + log 1)
    assert float(total.detach()) == pytest.approx(2 / 3 * math.log(2.0), rel=1e-6)
    total.backward()
    # effective weights z/(c L) = (1/3, 2/3) — the gradient w.r.t. each loss (c held constant)
    assert [float(a.grad), float(b.grad)] == pytest.approx([1 / 3, 2 / 3], rel=1e-6)
    assert [w["a"], w["b"]] == pytest.approx([1 / 3, 2 / 3], rel=1e-6)
    # after the model step the losses are (1, 0.4): Δ = (log 2, log 2.5)
    famo.after_step(L(a=1.0, b=0.4))
    z = [0.5, 0.5]
    delta = [math.log(2.0), math.log(1.0 / 0.4)]
    zd = sum(zi * di for zi, di in zip(z, delta))
    d = [zi * (di - zd) for zi, di in zip(z, delta)]
    x, m, v = _adam_step([0.0, 0.0], d, [0.0, 0.0], [0.0, 0.0], 1, 0.025, 1e-3)
    assert famo.logits.tolist() == pytest.approx(x, rel=1e-5)
    assert x[0] > 0 > x[1]  # the task that improved more (b: log 2.5 > log 2) loses weight
    # a second step (momentum and weight decay now matter), with two micro-batches averaged
    famo(L(a=1.2, b=0.3), step=1)
    famo(L(a=0.8, b=0.5), step=1)
    famo.after_step(L(a=0.9, b=0.2))
    z = softmax(x)
    delta = [math.log(1.0 / 0.9), math.log(0.4 / 0.2)]
    zd = sum(zi * di for zi, di in zip(z, delta))
    d = [zi * (di - zd) for zi, di in zip(z, delta)]
    x, m, v = _adam_step(x, d, m, v, 2, 0.025, 1e-3)
    assert famo.logits.tolist() == pytest.approx(x, rel=1e-5)
    # the reported weights follow the new logits
    z = softmax(x)
    _, w = famo(L(a=1.0, b=2.0), step=2)
    c = z[0] / 1.0 + z[1] / 2.0
    assert [w["a"], w["b"]] == pytest.approx([z[0] / c, z[1] / (2 * c)], rel=1e-5)


def test_famo_min_losses_and_skipped_step() -> None:
    famo = FAMO(["a", "b"], min_losses={"a": 0.5})
    total, _ = famo(L(a=1.5, b=2.0), step=0)
    # D = (1, 2), z = 1/2, c = 1/2 + 1/4 = 3/4: total = (2/3)(log 1 + log 2)
    assert float(total.detach()) == pytest.approx(2 / 3 * math.log(2.0), rel=1e-6)
    famo.after_step(None)  # skipped model step: no update, pending losses dropped
    assert famo.logits.tolist() == [0.0, 0.0]
    famo.after_step(L(a=1.0, b=1.0))  # nothing pending: no update
    assert famo.logits.tolist() == [0.0, 0.0]
    with pytest.raises(LossWeightingError, match="c"):
        FAMO(["a", "b"], min_losses={"c": 0.1})


# ---------------------------------------------------------------- IGB


def test_igb_weights_from_improvable_gaps() -> None:
    igb = IGB(TASKS)
    # epoch 1: w = 1, total = Σ log L; base losses = epoch averages (3, 6)
    for s, d in [(2.0, 4.0), (4.0, 8.0)]:
        total, w = igb(L(semseg=s, depth=d), step=0)
        assert w == {"semseg": 1.0, "depth": 1.0}
        assert float(total.detach()) == pytest.approx(math.log(s) + math.log(d))
    igb.end_epoch()
    # epoch 2: gaps (1.5/3, 4.5/6) = (0.5, 0.75); w = 2 softmax(gaps)
    total, w = igb(L(semseg=1.5, depth=4.5), step=1)
    expected = [2 * v for v in softmax([0.5, 0.75])]
    assert [w["semseg"], w["depth"]] == pytest.approx(expected, rel=1e-6)
    assert float(total.detach()) == pytest.approx(expected[0] * math.log(1.5) + expected[1] * math.log(4.5), rel=1e-6)
    # per step, and the base stays fixed after later epochs
    igb.end_epoch()
    total, w = igb(L(semseg=3.0, depth=3.0), step=2)
    expected = [2 * v for v in softmax([1.0, 0.5])]
    assert [w["semseg"], w["depth"]] == pytest.approx(expected, rel=1e-6)
    # temperature and the plain (non-log) form
    igb2 = IGB(TASKS, temperature=0.5, log_losses=False)
    igb2.end_epoch({"semseg": 3.0, "depth": 6.0})
    total, w = igb2(L(semseg=1.5, depth=4.5), step=0)
    expected = [2 * v for v in softmax([1.0, 1.5])]
    assert [w["semseg"], w["depth"]] == pytest.approx(expected, rel=1e-6)
    assert float(total.detach()) == pytest.approx(expected[0] * 1.5 + expected[1] * 4.5, rel=1e-6)


@pytest.mark.parametrize("cls", [IGB, DynamicWeightAverage])
def test_epoch_averages_skip_non_finite_losses(cls) -> None:
    wt = cls(TASKS)
    wt(L(semseg=2.0, depth=4.0), step=0)
    wt(L(semseg=float("nan"), depth=100.0), step=1)
    wt(L(semseg=4.0, depth=float("inf")), step=2)
    wt(L(semseg=4.0, depth=8.0), step=3)
    wt.end_epoch()  # averages of the finite steps only: (3, 6)
    if cls is IGB:
        _, w = wt(L(semseg=1.5, depth=4.5), step=4)
        assert [w["semseg"], w["depth"]] == pytest.approx([2 * v for v in softmax([0.5, 0.75])], rel=1e-6)
    else:
        wt(L(semseg=1.5, depth=4.5), step=4)
        wt.end_epoch()
        _, w = wt(L(semseg=1.0, depth=1.0), step=5)
        assert [w["semseg"], w["depth"]] == pytest.approx([2 * v for v in softmax([0.25, 0.375])], rel=1e-6)


def test_igb_base_epoch_two() -> None:
    igb = IGB(TASKS, base_epoch=2)
    igb(L(semseg=10.0, depth=10.0), step=0)
    igb.end_epoch()
    _, w = igb(L(semseg=2.0, depth=1.0), step=1)
    assert w == {"semseg": 1.0, "depth": 1.0}
    igb.end_epoch()  # base = (2, 1)
    _, w = igb(L(semseg=2.0, depth=2.0), step=2)
    assert [w["semseg"], w["depth"]] == pytest.approx([2 * v for v in softmax([1.0, 2.0])], rel=1e-6)


# ---------------------------------------------------------------- shared contracts

OPTIONS = {"fixed": {"weights": {"a": 2.0}}, "stch": {"warmup_epoch": 1}}  # stch: its reference point is set within the run


def _run(weighting, steps: range, values, shared_model: bool) -> list:
    """Drive `weighting` through the training protocol; returns what it reported."""
    out = []
    tasks = weighting.tasks
    opt = torch.optim.SGD(weighting.extra_parameters(), lr=0.01) if weighting.extra_parameters() else None
    for step in steps:
        W = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
        h = W @ torch.tensor([1.0 + 0.1 * step, 2.0], dtype=torch.float64)
        losses = {t: (h - values(step, i)) ** 2 + 0.1 for i, t in enumerate(tasks)}
        total, w = weighting(losses, step=step, shared=[W])
        if opt is not None:
            opt.zero_grad()
        total.backward()
        if opt is not None:
            opt.step()
        after = {t: v.detach() * 0.9 for t, v in losses.items()}
        weighting.after_step(after)
        if step % 3 == 2:
            weighting.end_epoch()
        out.append((float(total.detach()), w))
    return out


def _values(step: int, i: int) -> float:
    return math.sin(step + 2 * i) + 0.5 * i


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_state_dict_round_trip_gives_identical_next_output(name: str) -> None:
    tasks = ["a", "b", "c"]
    first = make_weighting(name, tasks, **OPTIONS.get(name, {}))
    _run(first, range(7), _values, True)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in first.state_dict().items()}
    second = make_weighting(name, tasks, **OPTIONS.get(name, {}))
    second.load_state_dict(state)
    a = _run(first, range(7, 12), _values, True)
    b = _run(second, range(7, 12), _values, True)
    assert a == b
    fresh = _run(make_weighting(name, tasks, **OPTIONS.get(name, {})), range(7, 12), _values, True)
    if name not in ("ew", "fixed", "gls", "log"):  # stateful: the loaded state matters
        assert fresh != a


def test_state_round_trips_through_a_checkpoint_folder(tmp_path) -> None:
    from mtvision.engine.checkpoint import load_checkpoint, save_checkpoint

    for name in ("famo", "rlw", "dwa", "igb", "gradnorm"):
        first = make_weighting(name, ["a", "b"])
        _run(first, range(5), _values, True)
        save_checkpoint(tmp_path / name, {"weighting": first.state_dict()})
        second = make_weighting(name, ["a", "b"])
        second.load_state_dict(load_checkpoint(tmp_path / name)["weighting"])
        assert _run(first, range(5, 9), _values, True) == _run(second, range(5, 9), _values, True)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_leaves_state_unchanged(name: str, bad: float) -> None:
    wt = make_weighting(name, ["a", "b"], **OPTIONS.get(name, {}))
    before_w = _run(wt, range(7), _values, True)[-1][1]
    before = {k: v.clone() for k, v in wt.state_dict().items() if isinstance(v, torch.Tensor)}
    has_extra = type(wt).get_extra_state is not torch.nn.Module.get_extra_state
    extra = repr(wt.get_extra_state()) if has_extra else None
    W = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    losses = {"a": (W * 2.0).sum() ** 2, "b": (W * 0.0 + bad).sum()}
    total, w = wt(losses, step=7, shared=[W])
    assert not math.isfinite(float(total.detach()))
    assert w == before_w
    wt.after_step(None)  # the trainer skipped the step
    after = {k: v for k, v in wt.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    if has_extra:
        assert repr(wt.get_extra_state()) == extra
    # the next finite step goes on as if the bad one had not happened
    twin = make_weighting(name, ["a", "b"], **OPTIONS.get(name, {}))
    _run(twin, range(7), _values, True)
    assert _run(wt, range(7, 10), _values, True) == _run(twin, range(7, 10), _values, True)


def test_famo_ignores_non_finite_losses_after_step() -> None:
    famo = FAMO(["a", "b"])
    famo(L(a=1.0, b=1.0), step=0)
    famo.after_step({"a": torch.tensor(0.5), "b": torch.tensor(float("nan"))})
    assert famo.logits.tolist() == [0.0, 0.0]
    assert famo.optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_single_task_works(name: str) -> None:
    wt = make_weighting(name, ["depth"], **({"weights": {"depth": 2.0}} if name == "fixed" else {}))
    W = torch.nn.Parameter(torch.tensor([0.5, 1.0]))
    for step in range(4):
        loss = (W.sum() - 3.0) ** 2 + 0.25
        total, w = wt({"depth": loss}, step=step, shared=[W])
        assert math.isfinite(float(total.detach()))
        total.backward()
        wt.after_step({"depth": loss.detach() * 0.5})
        wt.end_epoch()
    expected = {"fixed": 2.0, "uw": 0.5, "log": 1 / 2.5, "stch": 1 / 2.5}  # stch: 1/L in its warm-up; the others 1
    assert w["depth"] == pytest.approx(expected.get(name, 1.0))


def test_losses_must_match_tasks() -> None:
    wt = EqualWeighting(["semseg", "depth", "normals"])
    with pytest.raises(LossWeightingError) as err:
        wt(L(semseg=1.0, depth=1.0, edge=1.0), step=0)
    assert "normals" in str(err.value) and "edge" in str(err.value)
    with pytest.raises(LossWeightingError, match="scalar"):
        wt({"semseg": torch.ones(2), "depth": torch.tensor(1.0), "normals": torch.tensor(1.0)}, step=0)


def test_registry_and_did_you_mean() -> None:
    assert set(WEIGHTINGS) == {"ew", "fixed", "uw", "dwa", "gradnorm", "rlw", "gls", "log", "famo", "igb", "stch", "go4align"}
    assert isinstance(make_weighting("dwa", TASKS, temperature=1.0), DynamicWeightAverage)
    with pytest.raises(UnknownNameError, match="did you mean 'famo'"):
        make_weighting("fam", TASKS)
    with pytest.raises(UnknownNameError, match="did you mean 'temperature'"):
        make_weighting("dwa", TASKS, temperatur=1.0)
    with pytest.raises(MTVisionError):
        EqualWeighting(["a", "a"])
    with pytest.raises(MTVisionError):
        EqualWeighting([])


def test_defaults_are_the_papers() -> None:
    assert DynamicWeightAverage(TASKS).temperature == 2.0
    assert GradNorm(TASKS).alpha == 1.5
    famo = FAMO(TASKS)
    assert (famo.w_lr, famo.gamma) == (0.025, 1e-3)
    assert famo.optimizer.param_groups[0]["lr"] == 0.025 and famo.optimizer.param_groups[0]["weight_decay"] == 1e-3
    assert IGB(TASKS).temperature == 1.0 and IGB(TASKS).base_epoch == 1


def test_eval_mode_losses_do_not_enter_epoch_averages() -> None:
    dwa = DynamicWeightAverage(TASKS)
    dwa(L(semseg=2.0, depth=4.0), step=0)
    dwa.eval()
    dwa(L(semseg=50.0, depth=50.0), step=0)
    dwa.train()
    dwa.end_epoch()  # (2, 4)
    dwa(L(semseg=1.0, depth=4.0), step=1)
    dwa.end_epoch()  # (1, 4): r = (0.5, 1)
    _, w = dwa(L(semseg=1.0, depth=1.0), step=2)
    assert [w["semseg"], w["depth"]] == pytest.approx([2 * v for v in softmax([0.25, 0.5])], rel=1e-6)
