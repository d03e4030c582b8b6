"""TAPS layers: gating, the straight-through gradient, the sparsity penalty, learned gates, merging."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

from mtvision.models import task_adaptive as taps

TASKS = ("a", "b")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    ).eval()


def _adaptive(**kwargs) -> tuple[nn.Module, list[taps.TaskAdaptiveLayer]]:
    net = _net()
    taps.make_task_adaptive(net, TASKS, **kwargs)
    return net, list(taps.taps_layers(net))


def _randomise_deltas(layers, scale: float = 0.5) -> None:
    with torch.no_grad():
        for m in layers:
            for d in m.deltas.values():
                d.normal_(0, scale)


def _set_scores(layers, value: float, task: str | None = None) -> None:
    with torch.no_grad():
        for m in layers:
            for t, s in m.scores.items():
                if task is None or t == task:
                    s.fill_(value)


def _run(net, x, task):
    with taps.active_task(net, task), torch.no_grad():
        return net(x)


def test_conversion_wraps_every_conv_and_linear_with_zero_deltas_and_the_paper_defaults():
    net, layers = _adaptive()
    assert [m.layer_name for m in layers] == ["0", "3", "6"]
    assert isinstance(net[0], taps.TaskAdaptiveLayer) and isinstance(net[1], nn.BatchNorm2d)
    for m in layers:
        assert set(m.deltas) == set(TASKS) and all(not d.detach().any() for d in m.deltas.values())
        assert taps.SCORE_INIT == 0.15 and all(float(s.detach()) == pytest.approx(0.15) for s in m.scores.values())
        assert m.threshold == 0.1
        assert not any(p.requires_grad for p in m.base.parameters())  # the paper keeps W frozen
    assert net[0].out_channels == 4 and net[6].in_features == 6  # attributes read through to the layer
    _, trainable = _adaptive(freeze_shared=False)
    assert all(p.requires_grad for m in trainable for p in m.base.parameters())


def test_closed_gates_give_the_shared_network_exactly_and_zero_deltas_too():
    net, layers = _adaptive()
    x = torch.randn(2, 3, 9, 9)
    shared = _run(net, x, None)
    for t in TASKS:  # initial state: gates open, deltas zero
        assert torch.equal(_run(net, x, t), shared)
    _randomise_deltas(layers)
    _set_scores(layers, 0.05)  # every gate closed, deltas non-zero
    for t in TASKS:
        assert torch.equal(_run(net, x, t), shared)
    with torch.enable_grad(), taps.active_task(net, "a"):  # the differentiable path too (W + 0·ΔW)
        assert torch.equal(net(x), shared)


def test_opening_a_gate_changes_only_that_tasks_output():
    net, layers = _adaptive()
    x = torch.randn(2, 3, 9, 9)
    _randomise_deltas(layers)
    _set_scores(layers, 0.0)
    before = {t: _run(net, x, t) for t in TASKS}
    with torch.no_grad():
        layers[1].scores["b"].fill_(0.2)
    assert torch.equal(_run(net, x, "a"), before["a"])
    assert not torch.allclose(_run(net, x, "b"), before["b"])
    assert torch.equal(_run(net, x, None), before["a"])


@pytest.mark.parametrize("open_", [True, False])
def test_straight_through_gradient_reaches_the_scores(open_):
    net, layers = _adaptive()
    _randomise_deltas(layers, 0.3)
    _set_scores(layers, 0.3 if open_ else -0.2)
    x = torch.randn(3, 3, 9, 9)
    with taps.active_task(net, "b"):
        net(x).square().sum().backward()
    for m in layers:
        assert m.scores["a"].grad is None  # task a was not run
        g = m.scores["b"].grad
        assert g is not None and float(g) != 0.0
    # reference: the same loss as a function of a plain multiplier c in W + c·ΔW, at c = I(s ≥ τ)
    ref, ref_layers = _adaptive()
    for m, r in zip(layers, ref_layers):
        r.deltas["b"].data.copy_(m.deltas["b"].data)
    coeffs = [torch.tensor(1.0 if open_ else 0.0, requires_grad=True) for _ in ref_layers]
    handles = []
    for r, c in zip(ref_layers, coeffs):

        def run(module, inputs, output, r=r, c=c):
            w = r.base.weight + c * r.deltas["b"]
            if isinstance(r.base, nn.Conv2d):
                return r.base._conv_forward(inputs[0], w, r.base.bias)
            return nn.functional.linear(inputs[0], w, r.base.bias)

        handles.append(r.register_forward_hook(run))
    with taps.active_task(ref, "b"):
        ref(x).square().sum().backward()
    for m, c in zip(layers, coeffs):
        torch.testing.assert_close(m.scores["b"].grad, c.grad)
        delta_grad = m.deltas["b"].grad
        assert (float(delta_grad.abs().sum()) > 0) == open_  # a closed gate passes no gradient to ΔW


def test_penalty_equals_the_hand_computed_value():
    net, layers = _adaptive()
    values = {"a": [0.3, -0.2, 0.05], "b": [0.1, 0.0, 0.4]}
    with torch.no_grad():
        for t, vs in values.items():
            for m, v in zip(layers, vs):
                m.scores[t].fill_(v)
    lam = 0.7
    by_layer = lam * ((0.3 + 0.2 + 0.05) + (0.1 + 0.0 + 0.4)) / 3
    assert float(taps.sparsity_penalty(net, weight=lam).detach()) == pytest.approx(by_layer)
    assert float(taps.sparsity_penalty(net, ["b"], weight=lam).detach()) == pytest.approx(lam * 0.5 / 3)
    n = [4 * 3 * 3 * 3, 6 * 4 * 3 * 3, 2 * 6]
    by_params = lam * sum(ni * (abs(va) + abs(vb)) for ni, va, vb in zip(n, values["a"], values["b"])) / sum(n)
    assert float(taps.sparsity_penalty(net, weight=lam, normalise="params").detach()) == pytest.approx(by_params)
    with pytest.raises(ValueError, match="normalisation"):
        taps.sparsity_penalty(net, normalise="flops")


def _toy(lam: float, steps: int, *, lr: float = 0.05, phase_two_closed: bool = False) -> tuple[nn.Module, list[float]]:
    """Regression through one frozen linear layer: task 'a' is solved by W, task 'b' needs W + D."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 1, bias=False)
    x = torch.randn(64, 4)
    w_true_b = layer.weight.detach() + torch.tensor([[1.0, -2.0, 0.5, 1.5]])
    targets = {"a": x @ layer.weight.detach().T, "b": x @ w_true_b.T}
    net = nn.Sequential(layer)
    taps.make_task_adaptive(net, TASKS)
    (m,) = taps.taps_layers(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    losses = []

    def step():
        opt.zero_grad()
        loss = 0.0
        for t in TASKS:
            with taps.active_task(net, t):
                loss = loss + (net(x) - targets[t]).square().mean()
        losses.append(float(loss.detach()))
        (loss + taps.sparsity_penalty(net, weight=lam)).backward()
        opt.step()

    for _ in range(steps):
        step()
    if phase_two_closed:  # close b's gate by hand: its learned ΔW must pull it open again
        with torch.no_grad():
            m.scores["b"].fill_(0.05)
        for _ in range(steps):
            step()
    return net, losses


def test_a_large_penalty_closes_the_gates():
    net, losses = _toy(lam=5.0, steps=8, lr=0.01)  # the penalty moves s by lr·λ = 0.05 a step
    (m,) = taps.taps_layers(net)
    assert all(float(s.detach()) < taps.THRESHOLD for s in m.scores.values())
    assert taps.adapted_layers(net) == {"a": [], "b": []}


def test_without_penalty_the_task_that_needs_adaptation_keeps_and_reopens_its_gate():
    net, losses = _toy(lam=0.0, steps=15)
    (m,) = taps.taps_layers(net)
    assert float(m.scores["b"].detach()) > taps.SCORE_INIT  # ∂L/∂s = <∇W L, ΔW> < 0: b's score grows
    assert float(m.scores["a"].detach()) == pytest.approx(taps.SCORE_INIT)  # a is solved by W: no gradient
    assert losses[-1] < 0.1 * losses[0]
    net, _ = _toy(lam=0.0, steps=15, phase_two_closed=True)
    (m,) = taps.taps_layers(net)
    assert float(m.scores["b"].detach()) >= taps.THRESHOLD and taps.adapted_layers(net, ["b"]) == {"b": ["0"]}


def test_adapted_layers_reports_exactly_the_open_gates_and_stats_count_them():
    net, layers = _adaptive()
    with torch.no_grad():
        layers[0].scores["a"].fill_(0.1)  # s = τ counts as open (I(s ≥ τ))
        layers[1].scores["a"].fill_(0.099)
        layers[2].scores["a"].fill_(-0.5)
        layers[0].scores["b"].fill_(0.0)
    assert taps.adapted_layers(net) == {"a": ["0"], "b": ["3", "6"]}
    stats = taps.adaptation_stats(net)
    assert stats["a"]["open_layers"] == 1 and stats["b"]["open_fraction"] == pytest.approx(2 / 3)
    n = [108, 216, 12]
    assert stats["b"]["param_fraction"] == pytest.approx((n[1] + n[2]) / sum(n))


def test_merge_gives_a_plain_network_with_the_task_output():
    net, layers = _adaptive()
    _randomise_deltas(layers)
    with torch.no_grad():
        layers[1].scores["a"].fill_(0.0)  # one closed gate: its delta must not be merged
    x = torch.randn(2, 3, 9, 9)
    for t in TASKS:
        plain = taps.merge_task(net, t)
        assert not list(taps.taps_layers(plain))
        assert all("deltas" not in k and "scores" not in k for k in plain.state_dict())
        assert type(plain[0]) is nn.Conv2d and type(plain[6]) is nn.Linear
        with torch.no_grad():
            torch.testing.assert_close(plain(x), _run(net, x, t), rtol=0, atol=1e-6)
    assert len(list(taps.taps_layers(net))) == 3  # the TAPS network is left as it was


def test_layer_subclasses_and_layers_reached_twice():
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    net = nn.Sequential(Conv2dSame(3, 5, 3, stride=2), StdConv2d(5, 5, 1), nn.Flatten(2))
    head = nn.ModuleDict({"p": shared, "q": shared})
    names = taps.make_task_adaptive(head, TASKS)
    assert names == ["p"] and head["p"] is head["q"]
    taps.make_task_adaptive(net, TASKS)
    layers = list(taps.taps_layers(net))
    _randomise_deltas(layers, 0.1)
    x = torch.randn(1, 3, 7, 7)
    y = _run(net, x, "a")
    assert y.shape == (1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(taps.merge_task(net, "a")(x), y)
    assert not torch.allclose(_run(net, x, None), y)
