"""The shipped NYUv2-13 SegNet-MTAN configs through mtv-train, end to end on a fixture tree in MTAN's
layout (tiny images and a narrow SegNet): the papers' last-epochs report next to mtvision's selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtvision.cli.train import main as train_main
from mtvision.metrics.nyuv2_13 import delta_m_papers
from tests.data.test_nyuv2_13 import write_nyuv2_13_tree

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nyuv2_13"


def _args(config: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(CONFIGS / config), f"data.root={root}", "data.height=32", "data.width=64", "data.num_workers=0",
        "data.pin_memory=false", f"output_dir={out}", "model.backbone.kwargs.widths=[4,8,8,16,16]",
        "logging.console=plain", "logging.num_val_images=0", "logging.log_interval=1", *extra, "--device", "cpu",
    ]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _report(records: list[dict], epochs: int, averaging: str) -> tuple[dict, float]:
    prefix = f"test_last{epochs}/{averaging}/"
    last = [r for r in records if any(k.startswith(prefix) for k in r)][-1]
    metrics: dict[str, dict[str, float]] = {}
    for key, value in last.items():
        if key.startswith(prefix) and key.count("/") == 3:
            task, metric = key[len(prefix):].split("/")
            metrics.setdefault(task, {})[metric] = value
    return metrics, last[prefix + "delta_m_papers"]


@pytest.mark.slow
def test_papers_protocol_config_reports_the_last_epochs_mean_and_resumes_it(tmp_path, capsys):
    root = write_nyuv2_13_tree(tmp_path / "nyuv2", {"train": 8, "val": 3}, height=32, width=64)
    out = tmp_path / "run"
    assert train_main(_args("mtan_segnet_288x384.yaml", root, out, "train.epochs=1", "train.eval_interval=4")) == 0
    printed = capsys.readouterr().out
    assert "segnet + mtan" in printed and "mean over the last 1 epoch(s)" in printed
    # resumed for a second epoch: the first epoch's test scores come back from the checkpoint
    assert train_main(_args("mtan_segnet_288x384.yaml", root, out, "train.epochs=2", "train.eval_interval=4",
                            "--resume")) == 0
    assert "mean over the last 2 epoch(s)" in capsys.readouterr().out
    records = _records(out)
    for averaging in ("batch", "pixel"):
        metrics, delta = _report(records, 2, averaging)
        assert sum(len(m) for m in metrics.values()) == 9
        assert delta == pytest.approx(delta_m_papers(metrics))
    assert (out / "model" / "config.json").is_file()


def test_holdout_config_selects_on_train_and_reports_both(tmp_path, capsys):
    root = write_nyuv2_13_tree(tmp_path / "nyuv2", {"train": 10, "val": 3}, height=32, width=64)
    out = tmp_path / "run"
    assert train_main(_args("mtan_segnet_288x384_holdout.yaml", root, out, "train.epochs=1",
                            "train.eval_interval=2")) == 0
    printed = capsys.readouterr().out
    assert "test split (best validation checkpoint" in printed and "mean over the last 1 epoch(s)" in printed
    records = _records(out)
    assert any("val/semseg/mIoU" in r for r in records) and any("test/normals/mean" in r for r in records)
    metrics, _ = _report(records, 1, "batch")
    assert set(metrics) == {"semseg", "depth", "normals"}
