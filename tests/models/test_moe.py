"""MoE layer: equivalences with hand-computed mixtures, capacity, balancing loss, smooth load, routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtvision.errors import MTVisionError
from mtvision.models.moe import DISPATCHES, MoE, MoEError, cv_squared, prob_in_top_k, top_k

FORMS = ("grouped", "batched")
RESOLVE_DISPATCH = MoE.dispatch_form  # the real resolution of "auto" (the fixture below overrides it)


@pytest.fixture(autouse=True, params=FORMS)
def auto_dispatch(request, monkeypatch):
    """Every test runs with "auto" resolved to each form in turn (the CPU would always pick "grouped";
    "batched" is the GPU default and must pass the same tests)."""
    def form(self, device):
        return request.param if self.dispatch == "auto" else RESOLVE_DISPATCH(self, device)

    monkeypatch.setattr(MoE, "dispatch_form", form)
    return request.param


def _layer(dim=8, hidden=12, experts=4, k=2, **kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(dim, hidden, experts, k, **kw)
    with torch.no_grad():
        for w in m.gate_weight.values():
            w.normal_()
        m.b1.normal_(std=0.1)
        m.b2.normal_(std=0.1)
    return m


def test_all_experts_no_noise_equals_hand_mixture():
    m = _layer(k=4, noisy_gating=False).train()  # training mode: still no noise, no capacity
    x = torch.randn(2, 5, 8)
    out, _, stats = m(x)
    flat = x.reshape(-1, 8)
    weights = torch.softmax(flat @ m.gate_weight["shared"], dim=-1)
    expected = sum(weights[:, e : e + 1] * m.expert(e, flat) for e in range(4))
    torch.testing.assert_close(out, expected.reshape(2, 5, 8), atol=1e-5, rtol=1e-5)
    assert stats.dropped == 0 and stats.load.tolist() == [10, 10, 10, 10]


def test_top1_gate_forced_to_one_expert_is_that_expert():
    m = _layer(k=1).eval()
    with torch.no_grad():
        m.gate_weight["shared"].zero_()
        m.gate_weight["shared"][:, 2] = 10.0
    x = torch.rand(7, 8) + 0.1  # positive inputs: expert 2's logit is the largest for every token
    out, _, stats = m(x)
    torch.testing.assert_close(out, m.expert(2, x), atol=1e-6, rtol=1e-6)
    assert stats.load.tolist() == [0, 0, 7, 0]
    torch.testing.assert_close(stats.importance, torch.tensor([0.0, 0.0, 7.0, 0.0]))


def test_capacity_overflow_drops_the_later_tokens_and_counts_them():
    m = _layer(k=1, capacity_factor=1.0).eval()
    with torch.no_grad():
        m.gate_weight["shared"].zero_()
        m.gate_weight["shared"][:, 1] = 10.0
    x = torch.rand(10, 8) + 0.1
    out, _, stats = m(x)
    cap = 3  # ceil(1.0 * 10 tokens * k=1 / 4 experts)
    assert m.capacity(10) == cap and stats.capacity == cap
    torch.testing.assert_close(out[:cap], m.expert(1, x[:cap]), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[cap:], torch.zeros(10 - cap, 8))
    assert stats.dropped == 7
    assert stats.load.tolist() == [0, 10, 0, 0] and stats.kept.tolist() == [0, 3, 0, 0]
    assert {k: int(v) for k, v in stats.dropped_by_row.items()} == {"all": 7}


def test_capacity_priority_matches_a_token_loop_reference():
    """First choices of all tokens are placed before any second choice; within a rank, earlier tokens first."""
    m = _layer(experts=4, k=2, capacity_factor=0.75, noisy_gating=False).eval()
    x = torch.randn(12, 8)
    out, _, stats = m(x)
    clean, _ = m.gate_logits(x)
    values, idx = clean.topk(2, dim=-1)
    gates = torch.softmax(values, dim=-1)
    cap = m.capacity(12)  # ceil(0.75 * 12 * 2 / 4) = 5
    assert cap == 5
    filled, dropped = [0] * 4, 0
    expected = torch.zeros(12, 8)
    for rank in range(2):
        for n in range(12):
            e = int(idx[n, rank])
            if filled[e] < cap:
                filled[e] += 1
                expected[n] += gates[n, rank] * m.expert(e, x[n : n + 1])[0]
            else:
                dropped += 1
    assert dropped > 0 and stats.dropped == dropped
    assert stats.kept.tolist() == filled
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cv_squared_on_hand_made_importance():
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0, 6.0])).item() == pytest.approx(3.5 / 9.0)
    assert cv_squared(torch.full((5,), 2.0)).item() == pytest.approx(0.0)
    assert cv_squared(torch.tensor([4.0])).item() == 0.0


def test_unbiased_cv_squared_divides_by_n_minus_one():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, squared deviations 4 + 1 + 0 + 9 = 14
    assert cv_squared(x).item() == pytest.approx(14 / 4 / 9)
    assert cv_squared(x, unbiased=True).item() == pytest.approx(14 / 3 / 9)
    assert cv_squared(x, unbiased=True).item() == pytest.approx((x.var() / x.mean() ** 2).item())


RELEASE_GATE = dict(noisy_gating=False, gate_values="softmax_top_k", gate_init="kaiming_uniform",
                    expert_init="kaiming_uniform", balance_variance="unbiased")
"""M3ViT's released gate (FastMoE NoisyGate_VMoE at --vmoe_noisy_std 0)."""


def test_softmax_top_k_gate_mixes_unrenormalised_probabilities_of_all_experts():
    m = _layer(experts=5, k=2, **RELEASE_GATE).train()
    x = torch.randn(3, 4, 8)
    out, _, stats = m(x)
    flat = x.reshape(-1, 8)
    probs = torch.softmax(flat @ m.gate_weight["shared"], dim=-1)  # over all 5 experts
    top = probs.topk(2, dim=-1)
    expected = torch.zeros_like(flat)
    for j in range(2):
        for i in range(flat.shape[0]):
            e = int(top.indices[i, j])
            expected[i] += top.values[i, j] * m.expert(e, flat[i : i + 1])[0]
    torch.testing.assert_close(out, expected.reshape(3, 4, 8), atol=1e-5, rtol=1e-5)
    assert (top.values.sum(-1) < 1).all()  # not renormalised, unlike Shazeer's softmax over the top k
    torch.testing.assert_close(stats.importance, torch.zeros(5).index_add_(0, top.indices.reshape(-1), top.values.reshape(-1)))


def test_release_balancing_loss_uses_the_unbiased_variance_and_hard_load():
    m = _layer(experts=4, k=2, balance_weight=0.01, **RELEASE_GATE).train()
    x = torch.randn(16, 8)
    _, aux, _ = m(x)
    probs = torch.softmax(x @ m.gate_weight["shared"], dim=-1)
    top = probs.topk(2, dim=-1)
    full = torch.zeros_like(probs).scatter(1, top.indices, top.values)
    importance, load = full.sum(0), (full > 0).sum(0).float()
    expected = 0.01 * (importance.var() / importance.mean() ** 2 + load.var() / load.mean() ** 2)
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)


def test_release_initialisation_bounds():
    torch.manual_seed(0)
    m = MoE(48, 24, num_experts=16, top_k=4, **RELEASE_GATE)
    gate = m.gate_weight["shared"]  # nn.Linear's kaiming-uniform over the 48 x 16 matrix: fan-in 16
    assert gate.abs().max() <= 0.25 and gate.std().item() == pytest.approx(0.25 / 3**0.5, rel=0.1)
    for w, (out_f, in_f) in ((m.w1, (24, 48)), (m.w2, (48, 24))):  # FastMoE: fan-in out * in of E x out x in
        bound = 1 / (out_f * in_f) ** 0.5
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert m.b1.abs().sum() == 0 and m.b2.abs().sum() == 0
    default = MoE(48, 24, num_experts=16, top_k=4)
    assert default.gate_weight["shared"].abs().sum() == 0 and default.w1.std().item() == pytest.approx(0.02, rel=0.1)


def test_fixed_noise_applies_only_in_training_and_excludes_trainable_noise():
    m = _layer(experts=6, k=2, fixed_noise_std=0.5, **RELEASE_GATE)
    assert not list(m.noise_weight)
    x = torch.randn(40, 8)
    m.eval()
    torch.testing.assert_close(m(x).output, m(x).output)
    clean, std = m.gate_logits(x)
    assert std is None
    m.train()
    _, std = m.gate_logits(x)
    assert torch.equal(std, torch.full_like(clean, 0.5))
    torch.manual_seed(3)
    first = m(x)
    torch.manual_seed(4)
    assert not torch.allclose(first.output, m(x).output) and first.balance_loss is not None
    with pytest.raises(MoEError, match="fixed_noise_std"):
        MoE(8, 8, num_experts=4, top_k=2, fixed_noise_std=0.1)  # noisy_gating is on by default
    with pytest.raises(KeyError, match="MoE gate_values"):
        MoE(8, 8, num_experts=4, top_k=2, gate_values="softmax")


def test_balancing_loss_is_weighted_cv_squared_of_importance_and_load():
    m = _layer(experts=4, k=2, noisy_gating=False, balance_weight=0.05).train()
    _, aux, s = m(torch.randn(16, 8))
    expected = 0.05 * (cv_squared(s.importance) + cv_squared(s.load.float()))
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    m.eval()
    assert m(torch.randn(16, 8)).balance_loss is None  # the balancing loss is a training loss


def test_gradient_reaches_gate_and_noise_weights():
    m = _layer(experts=4, k=2).train()
    out, aux, _ = m(torch.randn(20, 8))
    (out.square().mean() + aux).backward()
    for name in ("gate_weight", "noise_weight"):
        grad = getattr(m, name)["shared"].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert m.w1.grad.abs().sum() > 0 and m.w2.grad.abs().sum() > 0
    # the smooth load estimator alone carries gradient to the noise weights
    m.zero_grad()
    m(torch.randn(20, 8)).balance_loss.backward()
    assert m.noise_weight["shared"].grad.abs().sum() > 0


def test_smooth_load_matches_monte_carlo_redraw_of_one_experts_noise():
    torch.manual_seed(1)
    n, num_e, k, draws = 3, 6, 2, 40000
    clean = torch.randn(n, num_e)
    std = torch.rand(n, num_e) + 0.3
    noisy = clean + torch.randn(n, num_e) * std
    prob = prob_in_top_k(clean, noisy, std, k)
    for e in range(num_e):
        others = torch.cat([noisy[:, :e], noisy[:, e + 1 :]], dim=1)
        kth_excluding = others.sort(dim=1, descending=True).values[:, k - 1 : k]
        redrawn = clean[:, e : e + 1] + torch.randn(n, draws) * std[:, e : e + 1]
        frequency = (redrawn > kth_excluding).float().mean(1)
        torch.testing.assert_close(prob[:, e], frequency, atol=0.015, rtol=0)


def test_noise_only_in_training():
    m = _layer(experts=4, k=1).eval()
    x = torch.randn(30, 8)
    torch.testing.assert_close(m(x).output, m(x).output)
    m.train()
    torch.manual_seed(3)
    first = m(x).output
    torch.manual_seed(4)
    assert not torch.allclose(first, m(x).output)


def test_too_many_experts_per_token_is_a_clear_error():
    with pytest.raises(MoEError, match="top_k=5 is larger than num_experts=4") as info:
        MoE(8, 8, num_experts=4, top_k=5)
    assert isinstance(info.value, MTVisionError)


def test_unknown_task_names_the_known_tasks():
    m = MoE(8, 8, 4, 2, tasks=["semseg", "depth"], routing="per_task")
    with pytest.raises(KeyError, match="unknown task of this MoE gate 'normals'.*valid: depth, semseg"):
        m(torch.randn(3, 8), "normals")
    with pytest.raises(MoEError, match="needs a task"):
        m(torch.randn(3, 8))
    with pytest.raises(MTVisionError, match="needs the task names"):
        MoE(8, 8, 4, 2, routing="per_task")


def test_per_task_gates_route_independently_and_a_batched_call_equals_separate_calls():
    m = _layer(k=2, tasks=["a", "b"], routing="per_task", noisy_gating=False).eval()
    xa, xb = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    together = m(torch.cat([xa, xb]), ["a", "b"]).output
    torch.testing.assert_close(together, torch.cat([m(xa, "a").output, m(xb, "b").output]), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(m(xa, "a").output, m(xa, "b").output)  # two different gates
    # a task's loss reaches only its own gate
    m.train()
    m(xa, "a").output.sum().backward()
    assert m.gate_weight["a"].grad.abs().sum() > 0 and m.gate_weight["b"].grad is None
    assert [p is m.gate_weight["b"] for p in m.gate_parameters("b")][0]


def test_task_embedding_gate_depends_on_the_task_and_learns_the_embedding():
    m = _layer(k=2, tasks=["a", "b"], routing="task_embedding", task_embed_dim=4, noisy_gating=False)
    assert m.gate_weight["shared"].shape == (8 + 4, 4)
    clean_a, _ = m.gate_logits(torch.zeros(3, 8), "a")
    clean_b, _ = m.gate_logits(torch.zeros(3, 8), "b")
    torch.testing.assert_close(clean_a[0], m.task_embedding[0] @ m.gate_weight["shared"][8:])
    assert not torch.allclose(clean_a, clean_b)
    m.train()
    m(torch.randn(6, 8), "b").output.sum().backward()
    assert m.task_embedding.grad[1].abs().sum() > 0 and m.task_embedding.grad[0].abs().sum() == 0


def test_usage_statistics_count_each_calls_assignments_per_task():
    m = _layer(k=2, tasks=["a", "b"], routing="per_task").eval()
    assert m(torch.randn(10, 8), "a").stats.usage["a"].sum().item() == 2 * 10
    usage = m(torch.cat([torch.randn(10, 8), torch.randn(4, 8)]), ["a", "a"]).stats.usage
    assert set(usage) == {"a"} and usage["a"].sum().item() == 2 * 14  # chunks of one task add up
    x = torch.randn(8, 8)
    split = m(x, ["a", "b"]).stats.usage
    assert set(split) == {"a", "b"} and split["b"].sum().item() == 2 * 4
    torch.testing.assert_close(split["b"], m(x[4:], "b").stats.usage["b"])  # routing as a separate call


@pytest.mark.parametrize("dispatch", FORMS)
def test_half_precision_tokens_pass_through_autocast(dispatch):
    m = _layer(k=2, dispatch=dispatch).eval()
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x).output
    assert out.dtype == torch.float32 and torch.allclose(out, m(x).output, atol=5e-2)


# ---------------------------------------------------------------- dispatch forms
def _token_loop(m: MoE, x: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
    """Per-token reference: each token through its top-k experts, weighted by its gates, written out
    by hand.  Assignments past an expert's capacity are dropped: all first choices are placed before
    any second choice, earlier tokens first.  Returns the output, the kept count per expert, the drops."""
    n, num_e = x.shape[0], m.num_experts
    clean, _ = m.gate_logits(x)
    values, idx = clean.topk(m.top_k, dim=-1)
    gates = torch.softmax(values, dim=-1)
    cap = m.capacity(n) or n * m.top_k
    filled, dropped = [0] * num_e, 0
    rows = [x.new_zeros(m.dim) for _ in range(n)]
    for rank in range(m.top_k):
        for t in range(n):
            e = int(idx[t, rank])
            if filled[e] == cap:
                dropped += 1
                continue
            filled[e] += 1
            hidden = F.gelu(m.w1[e] @ x[t] + m.b1[e])
            rows[t] = rows[t] + gates[t, rank] * (m.w2[e] @ hidden + m.b2[e])
    return torch.stack(rows), filled, dropped


def _outputs_and_grads(m: MoE, x: torch.Tensor, reference: bool = False):
    """Output, stats and the gradients of a fixed random projection of the output w.r.t. the tokens,
    the expert weights and the gate weights."""
    x = x.detach().clone().requires_grad_(True)
    if reference:
        out, kept, dropped = _token_loop(m, x)
    else:
        out, _, stats = m(x)
        kept, dropped = stats.kept.tolist(), stats.dropped
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    wrt = [x, m.w1, m.b1, m.w2, m.b2, m.gate_weight["shared"]]
    grads = torch.autograd.grad((out * probe).sum(), wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return out.detach(), kept, dropped, grads


def _check_forms_against_token_loop(x: torch.Tensor, starve: int | None = None, **kw) -> list[int]:
    """Both dispatch forms equal the per-token reference (output, kept, drops, gradients) and each
    other; `starve`: an expert whose gate column is made so negative that positive tokens never pick
    it.  Returns the kept count per expert."""

    def layer(dispatch: str) -> MoE:
        m = _layer(noisy_gating=False, dispatch=dispatch, **kw).eval()  # the same seed: the same weights
        if starve is not None:
            with torch.no_grad():
                m.gate_weight["shared"][:, starve] = -10.0
        return m

    expected = _outputs_and_grads(layer("grouped"), x, reference=True)
    results = {}
    for dispatch in FORMS:
        m = layer(dispatch)
        out, kept, dropped, grads = results[dispatch] = _outputs_and_grads(m, x)
        torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5, msg=lambda s, tag=dispatch: f"{tag}: {s}")
        assert (kept, dropped) == expected[1:3], dispatch
        assert {k: int(v) for k, v in m(x).stats.dropped_by_row.items()} == {"all": dropped}
        for g, ref, name in zip(grads, expected[3], ("x", "w1", "b1", "w2", "b2", "gate")):
            tag = f"{dispatch} d/d{name}"
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4, msg=lambda s, tag=tag: f"{tag}: {s}")
    grouped, batched = results["grouped"], results["batched"]
    torch.testing.assert_close(grouped[0], batched[0], atol=1e-6, rtol=1e-5)
    for g, h in zip(grouped[3], batched[3]):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)
    return expected[1]


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_dispatch_forms_match_a_token_loop_with_and_without_capacity(capacity_factor):
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    kept = _check_forms_against_token_loop(x, experts=4, k=2, capacity_factor=capacity_factor)
    if capacity_factor is None:
        assert sum(kept) == 24 * 2
    else:  # capacity ceil(0.75 * 24 * 2 / 4) = 9 slots: some assignments are dropped
        assert max(kept) == 9 and sum(kept) < 24 * 2


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_dispatch_forms_match_a_token_loop_with_every_expert_per_token(capacity_factor):
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    kept = _check_forms_against_token_loop(x, experts=4, k=4, capacity_factor=capacity_factor)
    assert kept == ([10] * 4 if capacity_factor is None else [5] * 4)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_dispatch_forms_match_a_token_loop_when_an_expert_gets_no_token(capacity_factor):
    x = torch.rand(12, 8, generator=torch.Generator().manual_seed(3)) + 0.1
    kept = _check_forms_against_token_loop(x, starve=3, experts=4, k=2, capacity_factor=capacity_factor)
    assert kept[3] == 0 and kept[:3] != [0, 0, 0]
    m = _layer(noisy_gating=False, dispatch="grouped", experts=4, k=2).eval()
    with torch.no_grad():
        m.gate_weight["shared"][:, 3] = -10.0
    m(x).output.sum().backward()
    assert m.w1.grad[3].abs().sum() == 0 and m.w1.grad[:3].abs().sum() > 0  # zero, not missing


def test_auto_dispatch_is_grouped_on_cpu_batched_on_gpu_and_bad_values_are_clear_errors():
    m = MoE(8, 8, 4, 2)
    assert DISPATCHES == ("auto", "grouped", "batched") and m.dispatch == "auto"
    assert RESOLVE_DISPATCH(m, "cpu") == "grouped" and RESOLVE_DISPATCH(m, "cuda") == "batched"
    assert RESOLVE_DISPATCH(MoE(8, 8, 4, 2, dispatch="batched"), "cpu") == "batched"
    with pytest.raises(KeyError, match="unknown MoE dispatch 'batch'; did you mean 'batched'") as info:
        MoE(8, 8, 4, 2, dispatch="batch")
    assert isinstance(info.value, MTVisionError)
    m.dispatch = "padded"
    with pytest.raises(MTVisionError, match="valid: auto, batched, grouped"):
        m(torch.randn(3, 8))


def test_dispatch_forms_share_parameters_and_state_dict_keys():
    grouped, batched = _layer(dispatch="grouped"), _layer(dispatch="batched")
    assert list(grouped.state_dict()) == list(batched.state_dict())
    assert grouped.w1.shape == (4, 12, 8) and grouped.w2.shape == (4, 8, 12)
    batched.load_state_dict(grouped.state_dict())
    x = torch.randn(9, 8)
    torch.testing.assert_close(grouped.eval()(x).output, batched.eval()(x).output, atol=1e-6, rtol=1e-5)


def test_dispatch_forms_agree_in_training_with_noise_and_on_empty_input():
    grouped, batched = _layer(k=2, dispatch="grouped").train(), _layer(k=2, dispatch="batched").train()
    x = torch.randn(30, 8)
    results = []
    for m in (grouped, batched):
        torch.manual_seed(5)  # the same noise
        results.append(m(x))
    torch.testing.assert_close(results[0].output, results[1].output, atol=1e-6, rtol=1e-5)
    assert results[0].balance_loss.item() == results[1].balance_loss.item()
    assert torch.equal(results[0].stats.usage["all"], results[1].stats.usage["all"])
    for m in (grouped, batched):
        empty = m(torch.randn(0, 8))
        assert empty.output.shape == (0, 8) and empty.stats.tokens == 0


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_is_torch_topk_with_ties_nans_and_gradients(k):
    torch.manual_seed(0)
    distinct = torch.randn(50, 6)
    tied = torch.zeros(4, 6)  # a zero-initialised gate: every expert ties; topk, not argmax, decides
    with_nan = distinct[:3].clone()
    with_nan[1, 2] = float("nan")
    for logits in (distinct, tied, with_nan, torch.cat([distinct, tied])):
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        values, idx = top_k(a, k)
        expected = b.topk(k, dim=-1)
        assert torch.equal(idx, expected.indices)
        torch.testing.assert_close(values, expected.values, equal_nan=True, atol=0, rtol=0)
        (values.nan_to_num() * torch.arange(1.0, k + 1)).sum().backward()
        (expected.values.nan_to_num() * torch.arange(1.0, k + 1)).sum().backward()
        assert torch.equal(a.grad, b.grad)
