"""End-to-end training on tiny synthetic runs: outputs, resume exactness, faults, DDP equivalence."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from mtvision.config import ConfigError, ExperimentConfig, from_dict
from mtvision.engine.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from mtvision.engine.run_folder import RunFolderError
from mtvision.engine.trainer import TrainingError, train
from tests.gloo import free_port


def tiny_config(out: Path, backbone: str = "test_resnet", **sections) -> ExperimentConfig:
    data = {
        "dataset": "synthetic",
        "tasks": ["semseg", "depth", "normals", "edge"],
        "height": 32,
        "width": 40,
        "scale_range": [0.8, 1.25],
        "num_samples": {"train": 16, "val": 4, "test": 4},
        "num_workers": 0,
        "pin_memory": False,
    }
    train_cfg = {"iterations": 8, "batch_size": 4, "eval_interval": 4, "seed": 3, "deterministic": True}
    optim = {"optimizer": "adamw", "lr": 1e-3, "warmup_iters": 2}
    logging = {"console": "plain", "log_interval": 2, "num_val_images": 2}
    data.update(sections.pop("data", {}))
    train_cfg.update(sections.pop("train", {}))
    optim.update(sections.pop("optim", {}))
    logging.update(sections.pop("logging", {}))
    raw = {
        "output_dir": str(out),
        "data": data,
        "train": train_cfg,
        "optim": optim,
        "logging": logging,
        "model": {"backbone": {"name": backbone}, "decoder": "hps", **sections.pop("model", {})},
    }
    return from_dict(ExperimentConfig, raw)


# Pixel-averaged losses (masked L1, ignore-aware CE) average over each batch's valid pixels, so a
# batch of 8 equals two batches of 4 only when every sample has the same number of valid pixels:
# no random scaling (whose padding marks pixels invalid) for the equivalence tests.  Batch norm
# depends on the batch split too: the equivalence tests use a LayerNorm backbone and group norm.
NO_PADDING = {"photometric": False, "scale_range": [1.0, 1.0]}
GROUP_NORM = {"decoder_options": {"norm": "gn"}}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(CheckpointManager(out).latest())["model"]


def test_a_run_writes_everything_a_user_needs(tmp_path, capsys):
    import mtvision

    result = train(tiny_config(tmp_path / "run"), device="cpu")
    out = tmp_path / "run"
    assert result.step == 8 and not result.interrupted and result.skipped_steps == 0
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file() and (out / "predictions.png").is_file()
    assert set(result.test_metrics) == {"semseg", "depth", "normals", "edge"}
    assert "mIoU" in result.test_metrics["semseg"] and "rmse" in result.test_metrics["depth"]
    assert result.best_step in (4, 8)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert any('"train/loss/semseg"' in line for line in lines) and any('"val/depth/rmse"' in line for line in lines)
    predictor = mtvision.load(out / "model")
    import numpy as np

    maps = predictor.predict(np.zeros((30, 41, 3), np.uint8))
    assert maps["semseg"].shape == (30, 41) and maps["depth"].shape == (30, 41)
    printed = capsys.readouterr().out
    assert "test split" in printed and "pretrained model" in printed


def test_refuses_a_used_output_dir_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(RunFolderError, match="--resume .* --overwrite"):
        train(tiny_config(out, train={"iterations": 2, "eval_interval": 2}), device="cpu")
    result = train(tiny_config(out, train={"iterations": 2, "eval_interval": 2}), overwrite=True, device="cpu")
    assert result.step == 2 and not (out / "something").exists()


def test_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_parameters(tmp_path):
    # 16 samples / batch 4 = 4 steps per epoch: stopping at step 6 is mid-way through the second epoch
    # drop-path draws from the global CPU random stream: resume must restore it exactly
    stochastic = {"backbone": {"name": "test_resnet", "drop_path_rate": 0.2}}
    reference = tiny_config(tmp_path / "ref", model=stochastic)
    train(reference, device="cpu")

    def kill_at_6(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = train(tiny_config(tmp_path / "cut", model=stochastic), on_step=kill_at_6, device="cpu")
    assert interrupted.interrupted and interrupted.step == 6
    resumed = train(tiny_config(tmp_path / "cut", model=stochastic), resume=True, device="cpu")
    assert resumed.step == 8 and not resumed.interrupted
    want, got = final_weights(tmp_path / "ref"), final_weights(tmp_path / "cut")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_resume_without_checkpoint_and_from_a_corrupt_one(tmp_path):
    with pytest.raises(RunFolderError, match="no checkpoint"):
        train(tiny_config(tmp_path / "none"), resume=True, device="cpu")
    out = tmp_path / "run"
    train(tiny_config(out, train={"iterations": 4, "eval_interval": 2}), device="cpu")
    manager = CheckpointManager(out)
    latest, older = manager.latest(), manager.checkpoints()[0]
    (latest / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.pt"):
        train(tiny_config(out, train={"iterations": 8, "eval_interval": 2}), resume=True, device="cpu")
    assert load_checkpoint(older)["step"] == 2  # the previous good checkpoint is intact


def test_non_finite_losses_are_skipped_and_counted_then_stop(tmp_path, monkeypatch, capsys):
    import mtvision.engine.objective as objective_module

    real = objective_module.compute_losses
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] in (2, 3):
            losses["depth"] = losses["depth"] * float("nan")
        return losses

    monkeypatch.setattr(objective_module, "compute_losses", sometimes_nan)
    result = train(tiny_config(tmp_path / "a", train={"iterations": 5, "eval_interval": 5}), device="cpu")
    assert result.skipped_steps == 2 and result.step == 5
    weights = final_weights(tmp_path / "a")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    monkeypatch.setattr(objective_module, "compute_losses", lambda *a, **k: {t: v * float("inf") for t, v in real(*a, **k).items()})
    with pytest.raises(TrainingError, match="3 consecutive steps had non-finite losses"):
        train(tiny_config(tmp_path / "b", train={"max_nonfinite_steps": 3}), device="cpu")


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 accumulated micro-batches of 4 = one batch of 8 (LayerNorm backbone: no batch statistics)."""
    big = tiny_config(tmp_path / "big", backbone="test_convnext", model=GROUP_NORM, data=NO_PADDING, train={"iterations": 3, "eval_interval": 3, "batch_size": 8})
    acc = tiny_config(tmp_path / "acc", backbone="test_convnext", model=GROUP_NORM, data=NO_PADDING, train={"iterations": 3, "eval_interval": 3, "batch_size": 4, "grad_accum": 2})
    train(big, device="cpu")
    train(acc, device="cpu")
    want, got = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    cfg = tiny_config(Path(out), backbone="test_convnext", model=GROUP_NORM, data=NO_PADDING, train={"iterations": 3, "eval_interval": 3, "batch_size": 4, "deterministic": False})
    train(cfg, device="cpu")


def _ddp_worker_augmented(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    train(tiny_config(Path(out), backbone="test_convnext", model=GROUP_NORM, data=DEFAULT_AUGMENTATION,
                      train={"iterations": 3, "eval_interval": 3, "batch_size": 4, "deterministic": False}), device="cpu")


# the default training augmentation: random scale 0.5-2 (with padding: samples differ in valid pixels),
# crop, flip, photometric distortion
DEFAULT_AUGMENTATION = {"scale_range": [0.5, 2.0]}


def test_ddp_with_the_default_augmentation_matches_one_process_with_the_same_global_batch(tmp_path):
    """Augmentation is seeded by (seed, epoch, sample index) and losses are pixel means over the
    whole global batch, so the rank layout changes nothing (no batch norm: a LayerNorm backbone)."""
    single = tiny_config(tmp_path / "single", backbone="test_convnext", model=GROUP_NORM, data=DEFAULT_AUGMENTATION,
                         train={"iterations": 3, "eval_interval": 3, "batch_size": 8, "deterministic": False})
    train(single, device="cpu")
    ctx = torch.multiprocessing.start_processes(
        _ddp_worker_augmented, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=False, start_method="fork"
    )
    while not ctx.join(timeout=120):
        pass
    want, got = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    # and the logged losses are the global batch's (averaged over ranks), not rank 0's shard
    import json

    rows = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp_rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    a = [r["train/loss"] for r in rows if "train/loss" in r]
    b = [r["train/loss"] for r in ddp_rows if "train/loss" in r]
    assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-4)


def test_gradient_accumulation_with_the_default_augmentation_equals_the_larger_batch(tmp_path):
    big = tiny_config(tmp_path / "big", backbone="test_convnext", model=GROUP_NORM, data=DEFAULT_AUGMENTATION, train={"iterations": 3, "eval_interval": 3, "batch_size": 8})
    acc = tiny_config(tmp_path / "acc", backbone="test_convnext", model=GROUP_NORM, data=DEFAULT_AUGMENTATION, train={"iterations": 3, "eval_interval": 3, "batch_size": 4, "grad_accum": 2})
    train(big, device="cpu")
    train(acc, device="cpu")
    want, got = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_ddp_two_processes_of_batch_4_match_one_process_of_batch_8(tmp_path):
    single = tiny_config(tmp_path / "single", backbone="test_convnext", model=GROUP_NORM, data=NO_PADDING, train={"iterations": 3, "eval_interval": 3, "batch_size": 8, "deterministic": False})
    train(single, device="cpu")
    ctx = torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=False, start_method="fork"
    )
    while not ctx.join(timeout=120):
        pass
    want, got = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_wandb_offline_run_gets_losses_metrics_pictures_and_the_model(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    cfg = tiny_config(tmp_path / "run", train={"iterations": 2, "eval_interval": 2}, logging={"wandb": True, "wandb_run_name": "tiny"})
    train(cfg, device="cpu")
    wandb.teardown()  # flush the offline transaction log before reading the files back
    runs = list((tmp_path / "wandb_dir").rglob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("*.wandb")).read_bytes()
    for key in (b"train/loss/semseg", b"val/depth/rmse", b"test/edge/odsF", b"val/predictions/semseg"):
        assert key in log, key
    media = [p.name for p in runs[0].rglob("*.png")]
    assert any(name.startswith("semseg") for name in media) and any(name.startswith("depth") for name in media)
    # the exported pretrained folder as a model artifact, aliased "best"
    assert b"model.safetensors" in log and b"config.json" in log and b"best" in log


def test_selection_by_delta_m_against_single_task_references(tmp_path):
    import json

    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"semseg": {"mIoU": 50.0}, "depth": {"rmse": 0.5}, "normals": {"mean": 20.0}, "edge": {"odsF": 50.0}}))
    cfg = tiny_config(tmp_path / "run", train={"iterations": 2, "eval_interval": 2, "references": str(refs)})
    result = train(cfg, device="cpu")
    m = result.val_metrics
    expected = 100 / 4 * (
        (m["semseg"]["mIoU"] - 50) / 50 - (m["depth"]["rmse"] - 0.5) / 0.5 - (m["normals"]["mean"] - 20) / 20 + (m["edge"]["odsF"] - 50) / 50
    )
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [line["val/score"] for line in lines if "val/score" in line]
    assert scores[-1] == pytest.approx(expected)
    bad = tiny_config(tmp_path / "bad", train={"references": str(tmp_path / "missing.json")})
    with pytest.raises(Exception, match="does not exist"):
        train(bad, device="cpu")


def test_resuming_with_a_longer_run_follows_the_new_schedule(tmp_path):
    import json

    from mtvision.engine.schedule import WarmupSchedule

    out = tmp_path / "run"
    train(tiny_config(out, train={"iterations": 4, "eval_interval": 4}), device="cpu")
    train(tiny_config(out, train={"iterations": 8, "eval_interval": 4}, optim={"lr": 2e-3}), resume=True, device="cpu")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {line["step"]: line["train/lr"] for line in lines if "train/lr" in line}
    schedule = WarmupSchedule(8, "poly", 2, 1e-3, 0.9, 0.0)  # tiny_config: warmup 2, default ratio and power
    # the rate logged at step 6 is the one the 6th optimizer step used (step index 5)
    assert logged[6] == pytest.approx(2e-3 * schedule(5)) and logged[6] > 0
    assert logged[8] == pytest.approx(2e-3 * schedule(7))


def test_evaluation_images_larger_than_the_pad_size_fail_at_start_up():
    from mtvision.data.synthetic import SyntheticScenes
    from mtvision.engine.data import _check_eval_size
    from mtvision.errors import DatasetError

    with pytest.raises(DatasetError, match="validation images are 40x48, larger than .* 32x40"):
        _check_eval_size(SyntheticScenes(2, 40, 48), 32, 40, "validation")
    _check_eval_size(SyntheticScenes(2, 32, 40), 32, 40, "validation")


def test_select_last_without_validation_reports_the_final_weights(tmp_path, capsys):
    """The releases' protocol: train on the whole training split, report the last iteration."""
    out = tmp_path / "run"
    cfg = tiny_config(out, data={"val_split": None}, train={"iterations": 4, "eval_interval": 2, "select": "last"})
    result = train(cfg, device="cpu")
    assert result.best_step is None and not (out / "checkpoints" / "best.json").exists()
    assert "test split (last iteration (train.select: last))" in capsys.readouterr().out
    from mtvision.models.pretrained import load_model

    exported = load_model(out / "model").state_dict()
    last = final_weights(out)  # the step-4 checkpoint
    assert exported.keys() == last.keys() and all(torch.equal(exported[k], last[k]) for k in last)
    with pytest.raises(ConfigError, match="train.select 'best' needs a validation split"):
        tiny_config(tmp_path / "x", data={"val_split": None}).validate()


def test_a_warmup_longer_than_the_run_is_cut_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="warmup_iters=50 is longer than the run"):
        train(tiny_config(tmp_path / "run", train={"iterations": 2, "eval_interval": 2}, optim={"warmup_iters": 50}), device="cpu")


def test_evaluation_progress_counts_images_not_batches():
    from mtvision.data.synthetic import SyntheticScenes
    from mtvision.data.transforms import eval_transforms
    from mtvision.engine.data import eval_loader
    from mtvision.engine.evaluator import evaluate
    from mtvision.engine.progress import Progress
    from mtvision.models.registry import create_model

    cfg = tiny_config(Path("/tmp/unused"))
    ds = SyntheticScenes(5, 32, 40, tasks=["depth"], transform=eval_transforms(32, 40))
    loader = eval_loader(ds, 2, cfg.data)
    model = create_model(backbone="test_resnet", tasks=["depth"])
    bar = Progress(len(loader), "eval", enabled=False)
    evaluate(model, loader, model.tasks, ds.meter_info(), torch.device("cpu"), progress=bar)
    assert (bar.count, bar.images) == (3, 5)  # batches of 2, 2, 1


def test_a_resumed_training_continues_its_wandb_run_and_tensorboard_folder(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import mtvision.engine.loggers as loggers

    runs = []

    class FakeRun:  # the W&B run init would give: an id, and what it was asked to continue
        def __init__(self, **kwargs):
            self.id = kwargs["id"] or f"run{len(runs)}"
            runs.append((kwargs["id"], kwargs["resume"]))

    def fake_init(self, project, **kwargs):
        self.run, self.prediction_key = FakeRun(**kwargs), "val/predictions"

    monkeypatch.setattr(loggers.WandbLogger, "__init__", fake_init)
    monkeypatch.setattr(loggers.WandbLogger, "log_config", lambda self, config: None)
    monkeypatch.setattr(loggers.WandbLogger, "log_scalars", lambda self, values, step: None)
    monkeypatch.setattr(loggers.WandbLogger, "log_predictions", lambda self, step, panels: None)
    monkeypatch.setattr(loggers.WandbLogger, "log_artifact", lambda self, *a, **k: None)
    monkeypatch.setattr(loggers.WandbLogger, "close", lambda self: None)
    out = tmp_path / "run"
    log = {"wandb": True, "tensorboard": True, "log_interval": 1}
    train(tiny_config(out, train={"iterations": 2, "eval_interval": 2}, logging=log), device="cpu")
    train(tiny_config(out, train={"iterations": 4, "eval_interval": 2}, logging=log), resume=True, device="cpu")
    assert runs == [(None, None), ("run0", "allow")]  # the resumed training continues the first W&B run
    events = EventAccumulator(str(out / loggers.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # one run, both parts
