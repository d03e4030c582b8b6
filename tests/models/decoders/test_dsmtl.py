"""DSMTL (mtvision/models/decoders/dsmtl.py): the gate's two ends are the single-task model and HPS,
the gate learns, individual vs joint learning, the compact search, private init from single-task folders."""

from __future__ import annotations

import math

import pytest
import torch

from mtvision.errors import CheckpointError
from mtvision.models import create_model
from mtvision.models.decoders.dsmtl import DSMTL_PRIVATE_COST, derive_private_stages
from mtvision.models.dsmtl_compact import compact_model
from mtvision.models.pretrained import load_model

SMALL = {"neck_channels": 16, "head_channels": 8}
TASKS = {"semseg": 5, "depth": None}


def _dsmtl(tasks=TASKS, **options):
    return create_model(backbone="test_resnet", decoder="dsmtl", tasks=tasks, decoder_options={**SMALL, **options})


def _hps(tasks=TASKS, **options):
    return create_model(backbone="test_resnet", decoder="hps", tasks=tasks, decoder_options={**SMALL, **options})


def _images(n=2, seed=0):
    return torch.randn(n, 3, 32, 40, generator=torch.Generator().manual_seed(seed))


def _trained_single_task(folder, task="depth", **options):
    """A single-task HPS model after two optimiser steps (non-trivial weights and BN statistics), saved."""
    torch.manual_seed(1)
    model = _hps({task: TASKS[task]}, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(2):
        opt.zero_grad()
        model(_images(seed=10 + i)).predictions[task].square().mean().backward()
        opt.step()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("search", [False, True])
def test_gate_fixed_private_is_exactly_the_single_task_model(tmp_path, search):
    single = _trained_single_task(tmp_path / "stl")
    model = _dsmtl(gate="private", private_init={"depth": str(tmp_path / "stl")})
    x = _images()
    for mode in (False, True):  # eval (running BN statistics), then train (batch statistics)
        single.train(mode), model.train(mode)
        assert torch.equal(model(x, ["depth"]).predictions["depth"], single(x).predictions["depth"])
    # the learned gate contains the single-task model: alpha = 0 reproduces it exactly
    learned = _dsmtl(search=search, private_init={"depth": str(tmp_path / "stl")}).eval()
    with torch.no_grad():
        learned.decoder.gate_logits["depth"].fill_(-math.inf)
    saved = load_model(tmp_path / "stl")  # the train-mode forward above moved `single`'s BN statistics
    assert torch.equal(learned(x).predictions["depth"], saved(x).predictions["depth"])


def test_gate_fixed_public_is_exactly_hps():
    torch.manual_seed(0)
    hps = _hps()
    model = _dsmtl(gate="public")
    d, h = model.decoder, hps.decoder
    d.public_backbone.load_state_dict(h.backbone.state_dict())
    d.public_neck.load_state_dict(h.neck.state_dict())
    d.heads.load_state_dict(h.heads.state_dict())
    assert not list(d.private_necks.parameters()), "a public gate builds no private encoders"
    x = _images()
    for mode in (True, False):
        hps.train(mode), model.train(mode)
        out, ref = model(x), hps(x)
        assert all(torch.equal(out.predictions[t], ref.predictions[t]) for t in TASKS)
    assert len(out.shared) == 1 and torch.equal(out.shared[0], ref.shared[0])


def test_the_gate_mixes_the_two_representations_and_learns():
    torch.manual_seed(0)
    model = _dsmtl(gate_init=0.25).train()
    d, x = model.decoder, _images()
    assert float(d.alpha("semseg").detach()) == pytest.approx(0.25)
    with torch.no_grad():  # the same batch statistics as the forward below
        public = d.public_neck(d.public_backbone(x))
        private = d.private_necks["semseg"](d.private_backbones["semseg"](x))
        by_hand = d.heads["semseg"](0.25 * public + 0.75 * private)
    out = d(x, ["semseg"]).predictions["semseg"]  # the decoder's own resolution
    assert torch.allclose(out, by_hand, atol=1e-5)
    # d loss / d a = sigmoid'(a) <d loss / d r, R_public - R_private>, sigmoid'(a) = alpha (1 - alpha)
    rep = (0.25 * public + 0.75 * private).requires_grad_()
    grad_rep = torch.autograd.grad(d.heads["semseg"](rep).square().mean(), rep)[0]
    expected = 0.25 * 0.75 * (grad_rep * (public - private)).sum()
    (grad_a,) = torch.autograd.grad(out.square().mean(), [d.gate_logits["semseg"]])
    assert grad_a.abs() > 0 and torch.allclose(grad_a, expected, rtol=1e-3, atol=1e-8)
    # training moves the gate; it is a task parameter of its own task only
    assert any(p is d.gate_logits["semseg"] for p in model.task_parameters("semseg"))
    assert not any(p is d.gate_logits["semseg"] for p in model.task_parameters("depth"))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(x).predictions["semseg"].square().mean().backward()
        opt.step()
    assert float(d.alpha("semseg").detach()) != pytest.approx(0.25, abs=1e-3)
    assert float(d.alpha("depth").detach()) == pytest.approx(0.25)  # depth's loss was not in the objective


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _norm(grads, prefix):
    gs = [g for n, g in grads.items() if n.startswith(prefix) and g is not None]
    return sum(float(g.square().sum()) for g in gs) ** 0.5


@pytest.mark.parametrize("staged", [False, True])
def test_individual_learning_keeps_the_public_encoder_out_of_the_gated_losses(staged):
    torch.manual_seed(0)
    extra = {"private_stages": {"semseg": [0, 1, 2, 3], "depth": [0, 1, 2, 3]}} if staged else {}
    public = "decoder.public_stages." if staged else "decoder.public_backbone."
    x = _images()
    joint = _dsmtl(strategy="joint", **extra).train()
    out = joint(x)
    assert out.deep_supervision == {}
    g = _grads(joint, out.predictions["semseg"].square().mean())
    assert _norm(g, public) > 0 and _norm(g, "decoder.public_neck.") > 0  # JL: through the gate

    individual = _dsmtl(strategy="individual", **extra).train()
    out = individual(x)
    assert set(out.deep_supervision) == set(TASKS) and len(out.deep_supervision["semseg"]) == 1
    g = _grads(individual, out.predictions["semseg"].square().mean())
    assert _norm(g, public) == 0 and _norm(g, "decoder.public_neck.") == 0
    assert _norm(g, "decoder.private_") > 0 and g["decoder.gate_logits.semseg"].abs() > 0
    g = _grads(individual, out.deep_supervision["semseg"][0].square().mean())  # HPS's objective
    assert _norm(g, public) > 0 and _norm(g, "decoder.private_") == 0 and g["decoder.gate_logits.semseg"] is None
    assert individual.eval()(x).deep_supervision == {}


def test_joint_learning_reaches_the_public_encoder_in_proportion_to_the_gate():
    torch.manual_seed(0)
    model = _dsmtl().train()
    x = _images()
    norms = []
    for logit in (0.0, -12.0):
        with torch.no_grad():
            model.decoder.gate_logits["semseg"].fill_(logit)
        norms.append(_norm(_grads(model, model(x).predictions["semseg"].square().mean()), "decoder.public_"))
    assert norms[1] < 1e-3 * norms[0]


def test_shared_tensors_cut_the_graph_in_the_compact_joint_model():
    torch.manual_seed(0)
    model = _dsmtl(private_stages={"semseg": [2, 3]}).train()
    out = model(_images())
    loss = sum(v.square().mean() for v in out.predictions.values())
    public = [p for n, p in model.named_parameters() if n.startswith("decoder.public_")]
    direct = torch.autograd.grad(loss, public, retain_graph=True)
    at_cut = torch.autograd.grad(loss, out.shared, retain_graph=True)
    through_cut = torch.autograd.grad(out.shared, public, at_cut)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(direct, through_cut))
    assert len(out.shared) == 5  # the 4 public stage outputs the task streams read, and the neck map


def test_search_draws_hard_choices_learns_them_and_prunes_to_the_chosen_copies():
    torch.manual_seed(0)
    model = _dsmtl(search=True, private_cost=0.2).train()
    d, x = model.decoder, _images()
    choices = d._choices("semseg")
    assert set(choices.tolist()) <= {0.0, 1.0}
    out = model(x)
    # at p = 0.5 the expected parameter share of the copies is 0.5 for every task
    assert float(out.regularizers[DSMTL_PRIVATE_COST]) == pytest.approx(0.2 * 0.5)
    g = _grads(model, out.predictions["semseg"].square().mean())
    assert g["decoder.search_logits.semseg"].abs().sum() > 0  # straight-through gradient reaches the choice
    with torch.no_grad():
        d.search_logits["semseg"].copy_(torch.tensor([-1.0, -1.0, 2.0, 0.5]))
        d.search_logits["depth"].copy_(torch.tensor([-3.0, -1.0, -1.0, -0.1]))
    assert derive_private_stages(model) == {"semseg": [2, 3], "depth": []}
    model.eval()
    runs = {"n": 0}
    for stage in d.private_copies["depth"].values():
        stage.register_forward_hook(lambda *_: runs.__setitem__("n", runs["n"] + 1))
    searched = model(x)
    assert runs["n"] == 0, "unchosen copies do not run in eval mode"
    compact = compact_model(model).eval()
    assert set(compact.decoder.private_copies["semseg"]) == {"2", "3"} and len(compact.decoder.private_copies["depth"]) == 0
    assert not compact.decoder.search and not list(compact.decoder.search_logits.parameters())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    pruned = compact(x)
    assert all(torch.equal(pruned.predictions[t], searched.predictions[t]) for t in TASKS)


def test_private_init_loads_exactly_and_rejects_what_does_not_fit(tmp_path):
    single = _trained_single_task(tmp_path / "stl")
    model = _dsmtl(private_init={"depth": str(tmp_path / "stl")})
    d, s = model.decoder, single.decoder
    for mine, theirs in ((d.private_backbones["depth"], s.backbone), (d.private_necks["depth"], s.neck), (d.heads["depth"], s.heads["depth"])):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(CheckpointError) as err:  # another neck width: shapes that do not fit
        _dsmtl(neck_channels=32, private_init={"depth": str(tmp_path / "stl")})
    msg = str(err.value)
    assert "private_init[depth]" in msg and "'decoder.neck." in msg and "(16," in msg and "(32," in msg
    with pytest.raises(CheckpointError, match="not of 'semseg'"):
        _dsmtl(private_init={"semseg": str(tmp_path / "stl")})
    create_model(backbone="test_convnext", decoder="hps", tasks={"depth": None}, decoder_options=SMALL).save_pretrained(tmp_path / "cnx")
    with pytest.raises(CheckpointError, match="backbone 'test_convnext'"):
        _dsmtl(private_init={"depth": str(tmp_path / "cnx")})
    with pytest.raises(ValueError, match="stages \\[7\\] out of range"):
        _dsmtl(private_stages={"depth": [7]})


@pytest.mark.slow
def test_mtv_train_runs_dsmtl_and_its_compact_search_on_synthetic_scenes(tmp_path):
    from mtvision.engine.trainer import train
    from mtvision.models.dsmtl_compact import write_compact
    from tests.engine.test_trainer import tiny_config

    x = _images()
    for name, options in (("il", {"strategy": "individual"}), ("search", {"search": True})):
        out = tmp_path / name
        cfg = tiny_config(
            out,
            train={"iterations": 2, "eval_interval": 2, "batch_size": 2},
            model={"decoder": "dsmtl", "decoder_options": {**SMALL, **options}},
        )
        train(cfg, device="cpu")
        model = load_model(out / "model")
        assert set(model(x).predictions) == {"semseg", "depth", "normals", "edge"}
    kept = write_compact(tmp_path / "search" / "model", tmp_path / "compact")
    searched, compact = load_model(tmp_path / "search" / "model"), load_model(tmp_path / "compact")
    assert derive_private_stages(compact) == kept == derive_private_stages(searched)
    assert all(torch.equal(compact(x).predictions[t], searched(x).predictions[t]) for t in kept)


def test_one_task_runs_only_its_own_private_encoder():
    model = _dsmtl().eval()
    calls = {t: 0 for t in TASKS}
    for t, backbone in model.decoder.private_backbones.items():
        backbone.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    assert list(model(_images(), ["depth"]).predictions) == ["depth"]
    assert calls == {"semseg": 0, "depth": 1}
    single = _dsmtl(gate="private")
    assert not hasattr(single.decoder, "public_backbone") and single.decoder.public_neck is None


def test_a_saved_model_reloads_without_its_single_task_folders(tmp_path):
    import shutil

    _trained_single_task(tmp_path / "stl")
    model = _dsmtl(private_init={"depth": str(tmp_path / "stl")}).eval()
    model.save_pretrained(tmp_path / "dsmtl")
    shutil.rmtree(tmp_path / "stl")  # private_init only initialises: the weights are in model.safetensors
    again = load_model(tmp_path / "dsmtl")
    assert "private_init" not in again.config.decoder_options
    x = _images()
    assert torch.equal(again(x).predictions["depth"], model(x).predictions["depth"])
