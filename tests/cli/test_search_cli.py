"""`mtv-search`: a tiny search from the shipped synthetic config, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtvision.cli.search import main
from mtvision.config import ExperimentConfig, load_config

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "search" / "bmtas_resnet18_synthetic.yaml")
TINY = ["model.backbone.name=test_resnet", "data.height=32", "data.width=32", "data.num_workers=0",
        "data.num_samples={train: 16, val: 4, test: 4}", "model.decoder_options={neck_channels: 8, head_channels: 8}",
        "search.epochs=2", "search.iterations_per_epoch=1", "search.batch_size=2", "search.console=plain"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_mtv_search_writes_a_spec_and_a_config_mtv_train_accepts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([CONFIG, *TINY, f"output_dir={out}", "--device", "cpu"]) == 0
    assert (out / "spec.yaml").is_file() and (out / "sharing.png").is_file()
    cfg = load_config(ExperimentConfig, out / "train_config.yaml")
    assert cfg.model.decoder == "branched" and cfg.output_dir == f"{out}/train"
    assert main([CONFIG, *TINY, f"output_dir={out}", "--device", "cpu"]) == 2  # in use without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([CONFIG, *TINY, f"output_dir={out}", "--device", "cpu", "--overwrite"]) == 0


def test_mtv_search_errors(tmp_path, capsys):
    assert main([CONFIG, *TINY, f"output_dir={tmp_path / 'b'}", "search.target_flops=1000", "--device", "cpu"]) == 2
    assert "below the cheapest tree" in capsys.readouterr().err
    assert main([CONFIG, "search.epochz=2"]) == 2
    assert "did you mean 'search.epochs'" in capsys.readouterr().err
    assert main([CONFIG, "search.epochs"]) == 2
    assert main([str(tmp_path / "missing.yaml")]) == 2
