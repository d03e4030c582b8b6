"""Loss weighting and gradient calibration inside `train()`: every method runs from a config, logs its
weights and conflict statistics, checkpoints its state exactly, and stays exact under DDP."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from mtvision.config import ConfigError
from mtvision.engine.checkpoint import load_checkpoint
from mtvision.engine.trainer import train
from mtvision.errors import UnknownNameError
from tests.engine.test_trainer import GROUP_NORM, NO_PADDING, final_weights, tiny_config
from tests.gloo import free_port

# 16 samples / batch 4 = 4 steps per epoch: 6 steps cross an epoch end (IGB updates there); DWA
# keeps w = 1 for two epochs, so its run has 2 steps per epoch (8 samples, batch 2, 2 micro-batches)
SMALL = {"num_samples": {"train": 8, "val": 4, "test": 4}}
PAIRS = [
    ("ew", "upgrad", "features", {}),
    ("uw", "mgda", "features", {}),
    ("dwa", "pcgrad", "params", {"grad_accum": 2, "batch_size": 2, "data": SMALL}),
    ("gradnorm", "cagrad", "fuller", {}),
    ("famo", "nash_mtl", "features", {"amp": "bf16"}),
    ("igb", "graddrop", "features", {}),
    ("rlw", "aligned_mtl", "params", {}),
    ("gls", "imtl_g", "features", {}),
]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("weighting", "method", "level", "train_options"), PAIRS)
def test_every_weighting_with_a_calibration_trains_and_logs(tmp_path, capsys, weighting, method, level, train_options):
    out = tmp_path / "run"
    train_options = dict(train_options)
    cfg = tiny_config(
        out,
        data=train_options.pop("data", {}),
        optim={"weighting": {"method": weighting}, "calibration": {"method": method, "level": level}, "grad_clip": 1.0},
        train={"iterations": 6, "eval_interval": 6, **train_options},
        logging={"log_interval": 1},
    )
    result = train(cfg, device="cpu")
    assert result.step == 6 and result.skipped_steps == 0
    rows = [r for r in _records(out) if "train/loss" in r]
    assert len(rows) == 6
    tasks = ["semseg", "depth", "normals", "edge"]
    for row in rows:
        weights = [row[f"train/loss_weight/{t}"] for t in tasks]
        assert all(math.isfinite(w) for w in weights)
        assert -1 <= row["train/calibration/cos/semseg~depth"] <= 1
        assert row["train/calibration/gramian_cond"] >= 1
        assert math.isfinite(row[f"train/calibration/weight/{tasks[0]}"])
    if weighting in ("uw", "gradnorm", "famo", "dwa", "rlw", "igb"):  # these weights move during the run
        assert len({tuple(round(r[f"train/loss_weight/{t}"], 9) for t in tasks) for r in rows}) > 1
    state = load_checkpoint(sorted((out / "checkpoints").iterdir())[-1])
    assert state["weighting"] is not None
    console = capsys.readouterr().err
    assert " | w " in console and " | cos_min " in console  # the weights and the worst conflict, per step
    assert all(torch.isfinite(v).all() for v in final_weights(out).values() if v.is_floating_point())


def test_famo_and_gradvac_state_makes_resume_exact(tmp_path):
    optim = {"weighting": {"method": "famo"}, "calibration": {"method": "gradvac"}}
    train(tiny_config(tmp_path / "ref", optim=optim), device="cpu")

    def kill_at_5(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = train(tiny_config(tmp_path / "cut", optim=optim), on_step=kill_at_5, device="cpu")
    assert cut.interrupted and cut.step == 5
    state = load_checkpoint(sorted((tmp_path / "cut" / "checkpoints").iterdir())[-1])
    assert state["calibrator"]["targets"] is not None  # GradVac's EMA targets are saved
    assert float(state["weighting"]["logits"].abs().sum()) > 0  # FAMO's logits moved and are saved
    train(tiny_config(tmp_path / "cut", optim=optim), resume=True, device="cpu")
    want, got = final_weights(tmp_path / "ref"), final_weights(tmp_path / "cut")
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_equal_weighting_calibration_at_params_level_is_the_plain_summed_step(tmp_path):
    train(tiny_config(tmp_path / "plain"), device="cpu")
    train(tiny_config(tmp_path / "ew", optim={"calibration": {"method": "ew", "level": "params"}}), device="cpu")
    want, got = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ew")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_unknown_methods_fail_before_any_work_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'famo'"):
        tiny_config(tmp_path / "a", optim={"weighting": {"method": "fam"}}).validate()
    with pytest.raises(ConfigError, match="did you mean 'pcgrad'"):
        tiny_config(tmp_path / "b", optim={"calibration": {"method": "pcgard"}}).validate()
    with pytest.raises(ConfigError, match="not one of"):
        tiny_config(tmp_path / "c", optim={"calibration": {"method": "mgda", "level": "layer"}})
    # compile works with every level (the model output carries the shared representation)
    tiny_config(tmp_path / "d", optim={"calibration": {"method": "mgda"}}, train={"compile": True}).validate()
    # option names are checked by the methods themselves, still before the run folder exists
    with pytest.raises(UnknownNameError, match="did you mean 'temperature'"):
        train(tiny_config(tmp_path / "e", optim={"weighting": {"method": "dwa", "options": {"temprature": 2}}}), device="cpu")
    with pytest.raises(UnknownNameError, match="did you mean 'c'"):
        train(tiny_config(tmp_path / "f", optim={"calibration": {"method": "cagrad", "options": {"cc": 0.5}}}), device="cpu")
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_fp16_overflow_with_calibration_lowers_the_scale_instead_of_stopping(tmp_path, monkeypatch):
    real = torch.amp.GradScaler.__init__

    def huge_scale(self, *args, **kwargs):
        kwargs["init_scale"] = 2.0**40
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", huge_scale)
    cfg = tiny_config(tmp_path / "run", optim={"calibration": {"method": "mgda"}},
                      train={"amp": "fp16", "iterations": 12, "eval_interval": 12, "max_nonfinite_steps": 3})
    result = train(cfg, device="cpu")
    assert result.step == 12 and result.skipped_steps == 0  # overflowing steps are GradScaler's to skip
    scale = load_checkpoint(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1])["scaler"]["scale"]
    assert float(scale) < 2.0**40
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run").values() if v.is_floating_point())


def _ddp_worker(rank: int, world: int, port: int, out: str, optim: dict) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    cfg = tiny_config(Path(out), backbone="test_convnext", model=GROUP_NORM, data=NO_PADDING, optim=optim,
                      train={"iterations": 3, "eval_interval": 3, "batch_size": 4, "deterministic": False})
    train(cfg, device="cpu")


@pytest.mark.parametrize("level", ["features", "params"])
def test_ddp_with_uncertainty_weighting_and_mgda_matches_one_process(tmp_path, level):
    optim = {"weighting": {"method": "uw"}, "calibration": {"method": "mgda", "level": level}}
    single = tiny_config(tmp_path / "single", backbone="test_convnext", model=GROUP_NORM, data=NO_PADDING, optim=optim,
                         train={"iterations": 3, "eval_interval": 3, "batch_size": 8, "deterministic": False})
    train(single, device="cpu")
    ctx = torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), optim), nprocs=2, join=False, start_method="fork"
    )
    while not ctx.join(timeout=120):
        pass
    want, got = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    w_single = load_checkpoint(sorted((tmp_path / "single" / "checkpoints").iterdir())[-1])["weighting"]["log_vars"]
    w_ddp = load_checkpoint(sorted((tmp_path / "ddp" / "checkpoints").iterdir())[-1])["weighting"]["log_vars"]
    torch.testing.assert_close(w_ddp, w_single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("calibration", [None, "mgda"])
def test_moe_balancing_loss_is_trained_outside_the_task_losses_and_expert_usage_is_logged(tmp_path, calibration):
    out = tmp_path / "run"
    model = {"backbone": {"name": "test_vit", "kwargs": {"img_size": [32, 40], "dynamic_img_size": True}},
             "decoder": "m3vit", "decoder_options": {"num_experts": 4, "top_k": 2, "head_channels": 8}}
    cfg = tiny_config(out, model=model, optim={"weighting": {"method": "uw"}, "calibration": {"method": calibration}},
                      train={"iterations": 2, "eval_interval": 2}, logging={"log_interval": 1})
    train(cfg, device="cpu")
    rows = [r for r in _records(out) if "train/loss" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["train/regularizer/moe_balance"] > 0 and "train/loss/moe_balance" not in row
        assert "train/loss_weight/moe_balance" not in row  # not a task: the weighting never sees it
        share = [row[f"train/experts/blocks.1/depth/e{i}"] for i in range(4)]
        assert sum(share) == pytest.approx(1.0) and row["train/experts/blocks.1/depth/min_share"] == pytest.approx(min(share))


def test_the_regularizer_adds_its_plain_gradient_with_and_without_calibration():
    from mtvision.engine.objective import build_objective
    from mtvision.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder="hps", tasks={"semseg": 3, "depth": None},
                         decoder_options={"neck_channels": 8, "head_channels": 8})
    images = torch.randn(2, 3, 32, 32)
    targets = {"semseg": torch.randint(0, 3, (2, 32, 32)), "depth": torch.rand(2, 1, 32, 32) + 1}
    results = []
    for calibration in (None, "ew"):
        model.zero_grad(set_to_none=True)
        out = model(images)
        losses = {t: model.tasks[t].loss(out.predictions[t], targets[t]) for t in targets}
        reg = 0.1 * sum(p.pow(2).sum() for p in model.decoder.backbone.parameters())
        output = out._replace(regularizers={"l2": reg})
        build_objective(model, list(targets), calibration=calibration).backward(losses, output)
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    out = model(images).predictions
    (sum(model.tasks[t].loss(out[t], targets[t]) for t in targets)
     + 0.1 * sum(p.pow(2).sum() for p in model.decoder.backbone.parameters())).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for got in results:
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


def test_taps_penalty_and_its_open_layers_are_logged(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, model={"decoder": "taps", "decoder_options": {"neck_channels": 8, "head_channels": 8}},
                      data={"tasks": ["semseg", "depth"]}, train={"iterations": 2, "eval_interval": 2}, logging={"log_interval": 1})
    train(cfg, device="cpu")
    rows = [r for r in _records(out) if "train/loss" in r]
    for row in rows:
        assert row["train/regularizer/taps_sparsity"] > 0  # the sparsity penalty, outside the task losses
        assert 0 <= row["train/taps/depth/open_fraction"] <= 1 and row["train/taps/semseg/open_layers"] >= 0
