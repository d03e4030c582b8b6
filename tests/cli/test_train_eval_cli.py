"""mtv-train and mtv-eval as a user runs them: errors, a tiny run, evaluation of its folder."""

from __future__ import annotations

import json

import yaml

from mtvision.cli.evaluate import main as eval_main
from mtvision.cli.train import main as train_main

TINY = {
    "data": {
        "dataset": "synthetic",
        "tasks": ["semseg", "depth"],
        "height": 32,
        "width": 40,
        "num_samples": {"train": 8, "val": 2, "test": 3},
        "num_workers": 0,
    },
    "model": {"backbone": {"name": "test_resnet"}, "decoder": "hps"},
    "optim": {"lr": 1e-3},
    "train": {"iterations": 2, "batch_size": 4, "eval_interval": 2},
    "logging": {"console": "plain", "num_val_images": 1},
}


def write_config(tmp_path, **changes) -> str:
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(tmp_path / "run")
    for section, values in changes.items():
        cfg[section].update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_typo_in_override_is_a_clear_error(tmp_path, capsys):
    assert train_main([write_config(tmp_path), "optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "did you mean 'optim.lr'" in err
    assert train_main([write_config(tmp_path), "optim.lr"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_missing_dataset_root_is_a_clear_error(tmp_path, capsys):
    path = write_config(tmp_path, data={"dataset": "nyud", "root": str(tmp_path / "nowhere")})
    assert train_main([path, "data.holdout_fraction=0.1", "data.test_split=val"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    assert not (tmp_path / "run").exists()  # nothing written: fixing the root and rerunning just works


def test_train_then_eval_the_run_folder(tmp_path, capsys):
    path = write_config(tmp_path)
    assert train_main([path, "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert (run / "model" / "config.json").is_file()
    assert train_main([path]) == 2  # the folder is in use now
    assert "--overwrite" in capsys.readouterr().err
    out = tmp_path / "metrics.json"
    preds = tmp_path / "preds"
    assert eval_main([str(run), "--split", "test", "--out", str(out), "--predictions", str(preds), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"semseg", "depth"} and report["split"] == "test"
    assert len(list(preds.glob("*_semseg.png"))) == 3 and len(list(preds.glob("*_image.png"))) == 3
    assert eval_main([str(tmp_path / "missing")]) == 2


def test_bf16_autocast_run_on_cpu(tmp_path):
    path = write_config(tmp_path, train={"amp": "bf16"})
    assert train_main([path, "--device", "cpu"]) == 0
