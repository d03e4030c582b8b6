"""MMoE / MMoEEx decoder: hand-computed mixtures, exclusivity masks, diversity, task subsets, learning."""

from __future__ import annotations

import pytest
import torch

from mtvision.models import create_model
from mtvision.models.decoders.base import MMOE_DIVERSITY
from mtvision.models.decoders.mmoe import MMoEDecoder, exclusivity_mask, expert_diversity, mean_pairwise_cosine
from mtvision.models.moe import MoEError
from tests.models.learning import adam_steps

TASKS3 = ("semseg", "depth", "normals")


def _model(tasks=TASKS3, **options):
    torch.manual_seed(0)
    options = {"num_experts": 4, "neck_channels": 16, "head_channels": 8, **options}
    spec = {t: (5 if t == "semseg" else None) for t in tasks}
    return create_model(backbone="test_resnet", decoder="mmoe", tasks=spec, decoder_options=options)


def _head_inputs(model):
    seen = {}
    for t, head in model.decoder.heads.items():
        head.register_forward_pre_hook(lambda _, args, t=t: seen.__setitem__(t, args[0]))
    return seen


@pytest.mark.parametrize("gate", ["pixel", "global"])
def test_each_task_head_reads_its_gated_mixture_of_experts(gate):
    model = _model(gate=gate).eval()
    dec = model.decoder
    seen = _head_inputs(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z = model(x).shared[0]
        experts = dec.experts(z)  # N x (E * C) x H x W: expert e owns channels e*C ... (e+1)*C
        c = dec.expert_channels
        for t in TASKS3:
            if gate == "pixel":
                g = torch.softmax(dec.gates[t](z), dim=1)
            else:
                g = torch.softmax(dec.gates[t](z.mean(dim=(2, 3))), dim=1)[:, :, None, None]
            expected = sum(g[:, e : e + 1] * experts[:, e * c : (e + 1) * c] for e in range(4))
            torch.testing.assert_close(seen[t], expected, atol=1e-5, rtol=1e-5)
    if gate == "global":  # one mixture per image
        weights = dec.gate_weights(z, "depth")
        assert weights.shape == (2, 4, 1, 1)


def test_exclusivity_reserves_experts_to_one_task_each():
    mask = exclusivity_mask(3, 6, alpha=0.5, seed=0)
    special = mask[:, :3]
    assert special.sum(0).tolist() == [1, 1, 1]  # each special expert belongs to exactly one task
    assert sorted(special.float().argmax(0).tolist()) == [0, 1, 2]  # the round robin serves every task
    assert mask[:, 3:].all()
    excl = exclusivity_mask(3, 6, alpha=0.5, mode="exclusion", seed=0)
    assert excl[:, :3].sum(0).tolist() == [2, 2, 2] and excl[:, 3:].all()
    assert exclusivity_mask(3, 6, alpha=0.0).all()
    assert torch.equal(exclusivity_mask(3, 6, 0.5, seed=1), exclusivity_mask(3, 6, 0.5, seed=1))
    with pytest.raises(MoEError, match="leaves task"):
        exclusivity_mask(3, 2, alpha=1.0)
    with pytest.raises(MoEError, match=r"\[0, 1\]"):
        exclusivity_mask(3, 6, alpha=1.5)


def test_masked_experts_get_zero_weight_and_no_gradient_from_other_tasks():
    model = _model(tasks=("semseg", "depth"), exclusivity=1.0).train()
    dec = model.decoder
    allowed = dec.allowed
    assert allowed.sum(0).tolist() == [1, 1, 1, 1]  # every expert exclusive to one task
    output = model(torch.randn(2, 3, 64, 64))
    out, z = output.predictions, output.shared[0]
    g = dec.gate_weights(z, "depth")
    assert torch.all(g[:, ~allowed[1]] == 0)
    torch.testing.assert_close(g.sum(1), torch.ones_like(g.sum(1)))
    out["depth"].square().mean().backward()
    conv = dec.experts[0].weight.grad.view(4, dec.expert_channels, -1)
    per_expert = conv.abs().sum(dim=(1, 2))
    assert torch.all(per_expert[~allowed[1]] == 0) and torch.all(per_expert[allowed[1]] > 0)


def test_diversity_regulariser_and_measure():
    same = torch.rand(2, 1, 3, 4, 4).expand(2, 3, 3, 4, 4)
    assert mean_pairwise_cosine(same).item() == pytest.approx(1.0, abs=1e-6)
    orthogonal = torch.zeros(1, 2, 1, 1, 2)
    orthogonal[0, 0, 0, 0, 0] = 1.0
    orthogonal[0, 1, 0, 0, 1] = 2.0
    assert mean_pairwise_cosine(orthogonal).item() == pytest.approx(0.0)
    model = _model(diversity_weight=0.3).train()
    out = model(torch.randn(2, 3, 64, 64))
    dec = model.decoder
    (z,) = out.shared
    n, _, h, w = z.shape
    experts = dec.experts(z).view(n, 4, dec.expert_channels, h, w)
    torch.testing.assert_close(dec.expert_outputs(z), experts)
    regularizer = out.regularizers[MMOE_DIVERSITY]
    assert regularizer.item() == pytest.approx(0.3 * mean_pairwise_cosine(experts).item(), rel=1e-4)
    regularizer.backward()
    assert dec.experts[0].weight.grad.abs().sum() > 0
    d = expert_diversity(experts)
    assert d.shape == (4, 4) and torch.allclose(d, d.t()) and d.diagonal().abs().max() == 0 and d.max() == 1
    assert _model().train()(torch.randn(2, 3, 32, 32)).regularizers == {}  # off by default


def test_single_task_forward_runs_only_that_head_and_matches():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    calls = {t: 0 for t in TASKS3}
    for t, head in model.decoder.heads.items():
        head.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    with torch.no_grad():
        full = model(x).predictions
        only = model(x, tasks=["normals"]).predictions
    assert list(only) == ["normals"] and calls == {"semseg": 1, "depth": 1, "normals": 2}
    torch.testing.assert_close(only["normals"], full["normals"], atol=1e-5, rtol=1e-5)


def test_shared_representation_and_parameters():
    model = _model()
    output = model(torch.randn(2, 3, 32, 32))
    (rep,) = output.shared
    for t in TASKS3:
        (g,) = torch.autograd.grad(output.predictions[t].mean(), rep, retain_graph=True)
        assert g.abs().sum() > 0
    dec = model.decoder
    assert {id(p) for p in model.task_parameters("depth")} == {
        id(p) for m in (dec.gates["depth"], dec.heads["depth"]) for p in m.parameters()
    }
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in dec.experts.parameters()} <= shared and {id(p) for p in dec.neck.parameters()} <= shared


def test_expert_usage_is_each_tasks_gate_mass():
    model = _model().eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    usage = {k: v for k, v in out.stats.items() if k.startswith("experts/")}
    assert set(usage) == {f"experts/{t}" for t in TASKS3}
    for v in usage.values():
        assert v.shape == (4,) and v.sum().item() == pytest.approx(3.0)  # one unit of gate mass per image
    g = model.decoder.gate_weights(out.shared[0], "depth")
    torch.testing.assert_close(usage["experts/depth"], g.mean(dim=(2, 3)).sum(0))
    with torch.no_grad():
        only = model(torch.randn(3, 3, 32, 32), tasks=["depth"]).stats
    assert set(only) == {"experts/depth"}


def test_mmoe_learns(synthetic_batch):
    torch.manual_seed(0)
    spec = {"semseg": synthetic_batch["num_classes"], "depth": None, "normals": None}
    options = {"num_experts": 4, "neck_channels": 16, "head_channels": 8, "exclusivity": 0.5}
    model = create_model(backbone="test_resnet", decoder="mmoe", tasks=spec, decoder_options=options)
    assert isinstance(model.decoder, MMoEDecoder)
    model.train()
    images = synthetic_batch["image"][:4]
    batch = {t: synthetic_batch[t][:4] for t in TASKS3}

    def total():
        out = model(images).predictions
        return sum(model.tasks[t].loss(out[t], batch[t]) for t in TASKS3)

    first, last = adam_steps(model, total, steps=5)
    assert last < first * 0.95


def test_bad_options_are_clear_errors():
    with pytest.raises(KeyError, match="did you mean 'pixel'"):
        _model(gate="pixels")
    with pytest.raises(KeyError, match="exclusion"):
        _model(exclusivity_mode="exclude")


def test_pretrained_folder_round_trip_keeps_the_exclusivity_mask(tmp_path):
    from mtvision.models import load_model

    model = _model(exclusivity=0.5).eval()
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path).eval()
    assert torch.equal(again.decoder.allowed, model.decoder.allowed)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x).predictions, again(x).predictions
    assert all(torch.equal(a[t], b[t]) for t in a)
