"""A tiny controllable run from `mtv-train`, then the trade-off tool on its folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mtvision.cli.predict import main as predict_main
from mtvision.cli.tradeoff import default_budgets, preferences
from mtvision.cli.tradeoff import main as tradeoff_main
from mtvision.cli.train import main as train_main
from mtvision.cv import cv2

TINY = {
    "data": {
        "dataset": "synthetic",
        "tasks": ["semseg", "depth", "normals"],
        "height": 32,
        "width": 40,
        "num_samples": {"train": 8, "val": 2, "test": 3},
        "num_workers": 0,
    },
    "model": {
        "backbone": {"name": "test_resnet"},
        "decoder": "controllable",
        "decoder_options": {"neck_channels": 16, "head_channels": 8, "num_random": 1},
    },
    "optim": {"lr": 1e-3},
    "train": {"iterations": 2, "batch_size": 4, "eval_interval": 2, "seed": 1},
    "logging": {"console": "plain", "num_val_images": 1, "log_interval": 1},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controllable_run")
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(tmp / "run")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_main([str(path), "--device", "cpu"]) == 0
    return tmp / "run"


@pytest.mark.slow
def test_tiny_training_run_logs_ci_kd_and_exports_a_controllable_model(run):
    assert (run / "model" / "config.json").is_file()
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["decoder"] == "controllable"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["train/regularizer/ci_kd"] > 0 for r in steps)  # the narrower encoders are taught


def test_saved_model_carries_every_sub_networks_recalibrated_batch_norms(run):
    """The trainer recalibrates every (encoder, decoder) width pair on the training split without
    augmentation before it saves: doing it again on the same batches changes nothing."""
    import torch

    from mtvision.config import ExperimentConfig, load_config
    from mtvision.engine.data import eval_loader, evaluation_set
    from mtvision.models.decoders.controllable import recalibrate_all
    from mtvision.models.pretrained import load_model

    model = load_model(run / "model", device="cpu")
    cfg = load_config(ExperimentConfig, run / "config.yaml")
    pre = model.config.preprocess
    dataset, _ = evaluation_set(cfg.data, cfg.data.train_split, pre.mean, pre.std)
    batches = [b["image"] for b in eval_loader(dataset, cfg.train.batch_size, cfg.data)]
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert recalibrate_all(model, batches) == 16
    again = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert saved.keys() == again.keys() and len(saved) > 0
    for k in saved:
        torch.testing.assert_close(saved[k], again[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_tradeoff_tool_writes_five_points_within_budget_and_a_plot(run, capsys):
    assert tradeoff_main([str(run), "--split", "test", "--favour-each", "--device", "cpu"]) == 0
    record = json.loads((run / "tradeoff.json").read_text())
    assert set(record["curves"]) == {"equal", "favour semseg", "favour depth", "favour normals"}
    low, high = record["range_gflops"]
    for label, points in record["curves"].items():
        assert len(points) == 5
        assert [p["budget_gflops"] for p in points] == pytest.approx(default_budgets(low, high, 5))
        for p in points:
            assert p["gflops"] <= p["budget_gflops"] * (1 + 1e-9)
            assert set(p["metrics"]) == {"semseg", "depth", "normals"}
        if label.startswith("favour "):
            t = label.split()[1]
            mid = points[2]["config"]["decoders"]
            assert all(mid[t] >= w for w in mid.values()) and mid[t] > min(mid.values())
    # the widest sub-network is the reference: Δm = 0 at the top of the equal curve (None where a
    # reference metric of the 2-step model is 0)
    top = record["curves"]["equal"][-1]
    assert top["config"] == {"encoder": 1.0, "decoders": {"semseg": 1.0, "depth": 1.0, "normals": 1.0}}
    assert top["delta_m"] is None or top["delta_m"] == pytest.approx(0.0)
    picture = cv2.imread(str(run / "tradeoff.png"))
    assert picture is not None and picture.shape[0] > 200 and picture.shape[1] > 400
    assert "Δm" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_flags_on_the_trained_run(run, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), image)
    budget = "1.0"  # GFLOPs: more than the widest tiny sub-network
    argv = ["--model", str(run / "model"), "--input", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"),
            "--no-progress", "--budget", budget, "--preference", "depth=1"]
    assert predict_main(argv) == 0
    assert (tmp_path / "o" / "x_depth.png").is_file()


def test_helpers():
    assert default_budgets(1.0, 3.0, 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert default_budgets(1.0, 3.0, 1) == [3.0]
    assert list(preferences(["a", "b"], None, True)) == ["equal", "favour a", "favour b"]
    assert preferences(["a", "b"], None, True)["favour b"] == {"a": 1.0, "b": 2.0}
