"""BMTAS: the exact expected-FLOPs resource loss, the argmax tree, and the search's direction."""

from __future__ import annotations

import pytest
import torch

from mtvision.models.branching_spec import BranchingSpec
from mtvision.models.config import ModelConfig
from mtvision.search.bmtas import BMTAS, Partitions, expected_copies, expected_flops, warmup_epochs
from mtvision.search.flops import BudgetError, FlopsTable, measure, spec_flops
from mtvision.search.supernet import SearchStepper, build_copies, fit_budget


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_expected_flops_two_tasks_two_stages_by_hand():
    p0 = torch.tensor([[0.7, 0.3], [0.4, 0.6]])  # stage 0: task i picks copy j
    p1 = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    table = FlopsTable((8, 8), (100.0, 1000.0), {"a": 5.0, "b": 7.0})
    q0 = 0.7 * 0.4 + 0.3 * 0.6  # P(same copy at stage 0) = 0.46
    q1 = 0.9 * 0.2 + 0.1 * 0.8  # = 0.26; shared at stage 1 only if shared at stage 0 too
    want = 100 * (q0 * 1 + (1 - q0) * 2) + 1000 * (q0 * q1 * 1 + (1 - q0 * q1) * 2) + 12
    assert float(expected_flops([p0, p1], table)) == pytest.approx(want)
    torch.testing.assert_close(expected_copies([p0, p1]), torch.tensor([2 - q0, 2 - q0 * q1]))


def test_expected_copies_match_monte_carlo_for_three_tasks():
    torch.manual_seed(0)
    probs = [torch.softmax(torch.randn(3, 3) * 2, -1) for _ in range(3)]
    exact = expected_copies([p.double() for p in probs])
    n = 200_000
    labels = torch.zeros(n, 3, dtype=torch.long)  # effective group id (a product code of the choices)
    counts = []
    for p in probs:
        choice = torch.multinomial(p, n, replacement=True).T  # (n, 3)
        labels = labels * 3 + choice
        same = labels[:, :, None] == labels[:, None, :]
        first = ~torch.tril(same, diagonal=-1).any(-1)  # a task that starts a new group
        counts.append(first.sum(-1).double().mean())
    torch.testing.assert_close(exact, torch.stack(counts), atol=0.01, rtol=0)


def test_partitions_and_meets():
    parts = Partitions(3)
    assert parts.num == 5  # Bell(3)
    shared = parts.items.index((0, 0, 0))
    separate = parts.items.index((0, 1, 2))
    pair = parts.items.index((0, 0, 1))
    other = parts.items.index((0, 1, 1))
    assert parts.meet[shared, pair] == pair and parts.meet[pair, other] == separate
    assert parts.sampled(torch.eye(3))[separate] == 1 and parts.sampled(torch.ones(3, 3).tril()[:, :1].expand(3, 3) * torch.tensor([1.0, 0, 0]))[shared] == 1
    with pytest.raises(Exception, match="1 to 7 tasks"):
        Partitions(8)


def _method(tasks) -> BMTAS:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"backbone": {"name": "test_resnet"}, "decoder": "branched",
                                 "decoder_options": {"neck_channels": 8, "head_channels": 8}, "tasks": dict(tasks)})
    return BMTAS(build_copies(cfg))


def test_derive_refines_the_argmax_choices_stage_by_stage():
    m = _method({"semseg": 4, "depth": None, "normals": None})
    with torch.no_grad():
        m.arch[0].copy_(torch.tensor([[3.0, 0, 0], [3.0, 0, 0], [3.0, 0, 0]]))  # all on copy 0
        m.arch[1].copy_(torch.tensor([[0, 3.0, 0], [0, 3.0, 0], [3.0, 0, 0]]))  # semseg+depth | normals
        m.arch[2].copy_(torch.tensor([[0, 3.0, 0], [0, 3.0, 0], [0, 3.0, 0]]))  # all on one copy: no merging back
        m.arch[3].copy_(torch.tensor([[3.0, 0, 0], [0, 0, 3.0], [0, 0, 3.0]]))
    spec = m.derive()
    assert [len(p) for p in spec.stages] == [1, 2, 2, 3]
    assert spec.stages[2] == (("semseg", "depth"), ("normals",))
    assert warmup_epochs(160) == 8 and warmup_epochs(19) == 1 and warmup_epochs(2) == 1 and warmup_epochs(1) == 0


def _toy(lam: float, same: bool, warm: int, steps: int, seed: int = 0):
    """Two label tasks on four fixed 32x32 images with coarse (8x8-block) labels."""
    m = _method({"semseg": 4, "parts": 4})
    table = measure(m.net.decoder, (32, 32))
    st = SearchStepper(m, m.net.decoder.tasks, weight_lr=1e-2, weight_decay=0.0, arch_lr=0.05, arch_weight_decay=0.0,
                       resource_weight=lam, table=table, seed=seed)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    a = torch.randint(0, 4, (4, 4, 4), generator=g)
    b = a.clone() if same else torch.randint(0, 4, (4, 4, 4), generator=g)
    up = lambda x: x.repeat_interleave(8, 1).repeat_interleave(8, 2)  # noqa: E731
    targets = {"semseg": up(a), "parts": up(b)}
    for _ in range(warm):
        st.weight_step(images, targets, 1.0, warmup=True)
    for _ in range(steps):
        st.arch_step(images, targets, 1.0)
    return m, table


def test_a_large_resource_weight_collapses_to_all_shared():
    m, table = _toy(lam=1e5, same=False, warm=0, steps=15)
    start = [0.5 / 2**k for k in range(4)]  # P(share) under uniform choices
    share = [float(s[0, 1]) for s in m.sharing()]
    assert all(s > s0 + 0.05 for s, s0 in zip(share, start))
    assert m.derive() == BranchingSpec.all_shared(["semseg", "parts"], 4, "test_resnet")
    assert m.expected_flops(table)["expected_flops"] < float(expected_flops([torch.full((2, 2), 0.5)] * 4, table))


def test_without_resource_loss_unrelated_tasks_move_apart():
    m, _ = _toy(lam=0.0, same=False, warm=30, steps=20)
    share = [float(s[0, 1]) for s in m.sharing()]
    start = [0.5 / 2**k for k in range(4)]
    assert all(s < s0 for s, s0 in zip(share, start))
    assert m.derive() == BranchingSpec.separate(["semseg", "parts"], 4, "test_resnet")


def test_fit_budget_merges_the_likeliest_siblings_until_within_budget():
    tasks = ["a", "b", "c"]
    table = FlopsTable((8, 8), (10.0, 20.0, 30.0), {t: 1.0 for t in tasks})
    spec = BranchingSpec.separate(tasks, 3)
    sharing = [torch.tensor([[1, 0.9, 0.1], [0.9, 1, 0.2], [0.1, 0.2, 1]])] * 3
    fitted = fit_budget(spec, sharing, table, budget=spec_flops(spec, table) - 10)
    assert fitted.stages[0] == (("a", "b"), ("c",)) and fitted.stages[1:] == spec.stages[1:]
    budget = 1 * 10 + 2 * 20 + 2 * 30 + 3
    fitted = fit_budget(spec, sharing, table, budget)
    assert spec_flops(fitted, table) <= budget
    assert fit_budget(spec, sharing, table, 1e9) == spec
    cheapest = BranchingSpec.all_shared(tasks, 3)
    assert fit_budget(spec, sharing, table, spec_flops(cheapest, table)).canonical() == cheapest.canonical()
    with pytest.raises(BudgetError, match="below the cheapest tree"):
        fit_budget(spec, sharing, table, spec_flops(cheapest, table) - 1)
