"""Learning to Branch: straight-through Gumbel-softmax, its temperature schedule, the argmax tree."""

from __future__ import annotations

import math

import pytest
import torch

from mtvision.models.branching_spec import BranchingSpec
from mtvision.models.config import ModelConfig
from mtvision.search.flops import measure, spec_flops
from mtvision.search.ltb import LearningToBranch, initial_temperature, warmup_epochs
from mtvision.search.supernet import InverseSqrtTemperature, LinearTemperature, build_copies, gumbel_softmax

TASKS = {"semseg": 4, "depth": None, "normals": None}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _method(tasks=TASKS) -> LearningToBranch:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"backbone": {"name": "test_resnet"}, "decoder": "branched",
                                 "decoder_options": {"neck_channels": 8, "head_channels": 8}, "tasks": dict(tasks)})
    return LearningToBranch(build_copies(cfg))


def test_hard_gumbel_is_one_hot_forward_with_the_soft_sample_gradient():
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    hard = gumbel_softmax(logits, 0.7, hard=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(hard.detach().sum(-1), torch.ones(2))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    (hard * weights).sum().backward()
    grad_hard = logits.grad.clone()
    logits.grad = None
    soft = gumbel_softmax(logits, 0.7, hard=False, generator=torch.Generator().manual_seed(5))  # the same noise
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))
    (soft * weights).sum().backward()
    torch.testing.assert_close(grad_hard, logits.grad)  # straight-through: the soft gradient
    assert grad_hard.abs().sum() > 0


def test_gumbel_noise_follows_the_generator():
    logits = torch.zeros(4, 4)
    a = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(1))
    c = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_softmax(logits, 0.0)


def test_temperature_schedules():
    ltb = InverseSqrtTemperature(initial_temperature(100))  # LibMTL: (epochs / 20) / sqrt(epoch + 1)
    assert ltb(0) == 5.0 and ltb(3) == pytest.approx(2.5) and ltb(99) == pytest.approx(0.5)
    assert warmup_epochs(100) == 1 and warmup_epochs(250) == 3 and warmup_epochs(5) == 1
    bmtas = LinearTemperature(5.0, 0.1, epochs=20, warmup=1)  # 5.0 -> 0.1 after the warm-up
    assert bmtas(0) == 5.0 and bmtas(1) == 5.0 and bmtas(19) == pytest.approx(0.1)
    assert bmtas(10) == pytest.approx(5.0 - 9 / 18 * 4.9)
    assert LinearTemperature(5.0, 0.1, epochs=1)(0) == 5.0


def test_derive_follows_argmax_parents_from_the_heads():
    m = _method()
    with torch.no_grad():
        for a in m.arch:
            a.zero_()
        # stage 1: blocks 0 and 1 read block 0 of stage 0, block 2 reads block 2 (two subtrees)
        m.arch[0].copy_(torch.tensor([[10.0, 0, 0], [10.0, 0, 0], [0, 0, 10.0]]))
        m.arch[1].copy_(torch.eye(3) * 10)  # stage 2: block i reads block i
        m.arch[2].copy_(torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 10.0, 0]]))  # stage 3: 0<-0, 1<-1, 2<-1
        m.arch[3].copy_(torch.tensor([[0, 0, 10.0], [10.0, 0, 0], [0, 10.0, 0]]))  # heads: semseg<-2, depth<-0, normals<-1
    spec = m.derive()
    # semseg: 2 <- 1 <- 1 <- 0; depth: 0 <- 0 <- 0 <- 0; normals: 1 <- 1 <- 1 <- 0
    want = BranchingSpec.from_labels(list(TASKS), [[0, 0, 0], [1, 0, 1], [1, 0, 1], [2, 0, 1]], "test_resnet").canonical()
    assert spec == want
    share = m.sharing()
    assert share[0][0, 1] > 0.99 and share[1][0, 2] > 0.98 and share[1][0, 1] < 0.02 and share[3][0, 2] < 0.02
    table = measure(m.net.decoder, (32, 32))
    flops = m.expected_flops(table)
    assert flops["derived_flops"] == spec_flops(spec, table)
    assert flops["expected_copies"][0] == pytest.approx(1.0, abs=0.05) and flops["expected_copies"][3] == pytest.approx(3, abs=0.1)


def test_forward_runs_the_sampled_tree_and_trains_the_logits():
    m = _method()
    with torch.no_grad():  # copies start equal (no preference between parents): make them differ
        for p in m.net.decoder.branches.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 32, 32)
    gates = m.mixing(1.0, False, torch.Generator().manual_seed(0), grad=True)
    assert all(set(g.detach().unique().tolist()) <= {0.0, 1.0} for g in gates)
    out = m.net(images, gates)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semseg": (2, 4, 32, 32), "depth": (2, 1, 32, 32), "normals": (2, 3, 32, 32)}
    sum(v.square().mean() for v in out.values()).backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in m.arch)
    warm = m.mixing(1.0, True, torch.Generator(), grad=True)  # warm-up: every child averages its parents
    assert all(torch.allclose(g, torch.full((3, 3), 1 / 3)) and not g.requires_grad for g in warm)
    assert math.isfinite(float(m.net(images, warm)["depth"].detach().mean()))
