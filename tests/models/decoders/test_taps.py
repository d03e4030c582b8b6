"""The TAPS decoder: per-task backbone passes, gates, the sparsity penalty, export, and training."""

from __future__ import annotations

import json

import pytest
import torch

from mtvision.engine.trainer import train
from mtvision.models import create_model
from mtvision.models import task_adaptive as taps
from mtvision.models.decoders.base import TAPS_SPARSITY
from mtvision.models.decoders.taps import TAPSDecoder
from mtvision.models.registry import get_decoder
from tests.engine.test_trainer import final_weights, tiny_config

TASKS3 = ("semseg", "depth", "normals")


def _model(**options):
    torch.manual_seed(0)
    options = {"neck_channels": 16, "head_channels": 8, **options}
    return create_model(
        backbone="test_resnet",
        decoder="taps",
        tasks={"semseg": 5, "depth": None, "normals": None},
        decoder_options=options,
    )


def _layers(model) -> list[taps.TaskAdaptiveLayer]:
    return list(taps.taps_layers(model.decoder.backbone))


def test_registered_builds_and_trains_deltas_scores_necks_and_heads():
    assert get_decoder("taps") is TAPSDecoder
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    output = model(x)
    out, regs = output.predictions, output.regularizers
    assert {t: tuple(out[t].shape) for t in TASKS3} == {
        "semseg": (2, 5, 32, 32),
        "depth": (2, 1, 32, 32),
        "normals": (2, 3, 32, 32),
    }
    assert set(out) == set(TASKS3) and set(regs) == {TAPS_SPARSITY} and regs[TAPS_SPARSITY].ndim == 0
    (sum(out[t].mean() for t in TASKS3) + regs[TAPS_SPARSITY]).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    decoder = model.decoder
    assert decoder.layer_names[:2] == ["body.conv1.0", "body.conv1.3"] and len(decoder.layer_names) == 15
    assert all(not p.requires_grad for m in _layers(model) for p in m.base.parameters())  # paper: W frozen
    own = {id(p) for p in decoder.task_parameters("depth")}
    assert {id(m.deltas["depth"]) for m in _layers(model)} <= own
    assert {id(m.scores["depth"]) for m in _layers(model)} <= own
    assert {id(p) for p in decoder.heads["depth"].parameters()} <= own and not own & {
        id(p) for p in decoder.necks["semseg"].parameters()
    }
    shared = {id(p) for p in decoder.shared_parameters()}
    assert {id(m.base.weight) for m in _layers(model)} <= shared and not own & shared
    assert output.shared == []
    with torch.no_grad():
        assert model.eval()(x).regularizers == {}


def test_freeze_shared_false_trains_w():
    model = _model(freeze_shared=False)
    assert all(p.requires_grad for m in _layers(model) for p in m.base.parameters())


def test_gradient_checkpointing_is_refused():
    with pytest.raises(ValueError, match="grad_checkpointing"):
        create_model(backbone={"name": "test_resnet", "grad_checkpointing": True}, decoder="taps", tasks=["depth"])


def test_one_backbone_pass_per_requested_task():
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    model.decoder.backbone.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        only = model(x, tasks=["depth"]).predictions
        assert len(calls) == 1 and list(only) == ["depth"]
        full = model(x).predictions
    assert len(calls) == 1 + 3
    torch.testing.assert_close(only["depth"], full["depth"], rtol=0, atol=0)


def test_closed_gates_give_the_shared_backbone_and_one_open_gate_changes_only_its_task():
    model = _model().eval()
    decoder, layers = model.decoder, _layers(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for m in layers:
            for t in TASKS3:
                m.deltas[t].normal_(0, 0.05)
                m.scores[t].fill_(0.0)
        shared = decoder.task_features(x, None)
        for t in TASKS3:
            for a, b in zip(decoder.task_features(x, t), shared):
                assert torch.equal(a, b)
        before = model(x).predictions
        layers[1].scores["depth"].fill_(0.5)  # a stem conv (timm zero-inits the blocks' last BN at first)
        after = model(x).predictions
        moved = decoder.task_features(x, "depth")[-1]
    assert decoder.adapted_layers() == {"semseg": [], "depth": [layers[1].layer_name], "normals": []}
    assert torch.equal(after["semseg"], before["semseg"]) and torch.equal(after["normals"], before["normals"])
    assert not torch.equal(after["depth"], before["depth"])
    assert float((moved - shared[-1]).abs().max()) > 1e-2
    scalars = model.state_scalars()
    assert scalars["taps/depth/open_layers"] == 1 and scalars["taps/semseg/open_fraction"] == 0
    n = layers[1].num_weights / sum(m.num_weights for m in layers)
    assert scalars["taps/depth/param_fraction"] == pytest.approx(n)


def test_penalty_over_the_requested_tasks_and_warmup():
    model = _model(sparsity=2.0, penalty_warmup=1).train()
    x = torch.randn(2, 3, 32, 32)
    assert TAPS_SPARSITY not in model(x).regularizers  # the first training forward is in the warm-up
    out = model(x, tasks=["depth", "normals"]).regularizers
    # every score starts at 0.15: λ · (1/L) Σ_l 0.15 per task, two tasks
    assert float(out[TAPS_SPARSITY].detach()) == pytest.approx(2.0 * 0.15 * 2, rel=1e-6)
    by_params = _model(penalty="params").train()(x, tasks=["depth"]).regularizers[TAPS_SPARSITY]
    assert float(by_params.detach()) == pytest.approx(0.15, rel=1e-6)
    with pytest.raises(ValueError, match="penalty"):
        _model(penalty="flops")


def test_export_gives_a_plain_network_with_the_task_output():
    model = _model().eval()
    with torch.no_grad():
        for i, m in enumerate(_layers(model)):
            m.deltas["normals"].normal_(0, 0.05)
            m.scores["normals"].fill_(0.3 if i % 2 else 0.0)
    x = torch.randn(2, 3, 32, 32)
    plain = model.decoder.export("normals").eval()
    assert not list(taps.taps_layers(plain)) and not any("deltas" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.decoder(x, ["normals"]).predictions["normals"], rtol=0, atol=1e-5)


def test_trainer_adds_the_penalty_and_it_reaches_the_scores(tmp_path):
    out = tmp_path / "run"
    model = {"decoder": "taps", "decoder_options": {"sparsity": 50.0, "neck_channels": 16, "head_channels": 8}}
    cfg = tiny_config(
        out,
        model=model,
        train={"iterations": 2, "eval_interval": 2},
        optim={"warmup_iters": 0},
        logging={"log_interval": 1},
    )
    train(cfg, device="cpu")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    penalties = [r["train/regularizer/taps_sparsity"] for r in rows if "train/regularizer/taps_sparsity" in r]
    assert len(penalties) == 2 and all(p > 0 for p in penalties)
    scores = {k: v for k, v in final_weights(out).items() if ".scores." in k}
    assert len(scores) == 15 * 4
    # ΔW = 0 at the start: the first step's score gradient is the penalty's alone, pushing every score down
    assert all(float(v) < taps.SCORE_INIT for v in scores.values())


def test_every_backbone_family_gets_task_networks_that_start_shared_and_export_exactly(tiny_backbone):
    torch.manual_seed(0)
    model = create_model(
        backbone=tiny_backbone,
        decoder="taps",
        tasks={"semseg": 5, "depth": None},
        decoder_options={"neck_channels": 16, "head_channels": 8},
    ).eval()
    decoder, x = model.decoder, torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        shared = decoder.task_features(x, None)
        assert all(torch.equal(a, b) for a, b in zip(decoder.task_features(x, "depth"), shared))  # ΔW = 0
        for m in _layers(model):
            m.deltas["depth"].normal_(0, 0.02)
        assert all(torch.equal(a, b) for a, b in zip(decoder.task_features(x, "semseg"), shared))
        assert any(not torch.equal(a, b) for a, b in zip(decoder.task_features(x, "depth"), shared))
        exported = decoder.export("depth").eval()(x)
        torch.testing.assert_close(exported, decoder(x, ["depth"]).predictions["depth"], rtol=0, atol=1e-5)
