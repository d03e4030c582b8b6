"""`mtv-predict --budget GFLOPS --preference task=w ...`: the chosen sub-network's maps, clear failures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import mtvision
from mtvision.cli.predict import main, parse_preference
from mtvision.models import create_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder="controllable", tasks={"semseg": 5, "depth": None},
                         decoder_options={"neck_channels": 16, "head_channels": 8})
    path = tmp_path_factory.mktemp("controllable")
    model.save_pretrained(path)
    return path


def _write(path, h=64, w=96, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def test_budget_and_preference_flags_run_the_chosen_sub_network(model_dir, tmp_path, capsys):
    image = tmp_path / "a.png"
    rgb = _write(image)
    predictor = mtvision.load(model_dir)
    budget = 0.5 * predictor.select_widths(input_size=(64, 96)).flops / 1e9
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--input", str(image), "--out", str(out), "--npy", "--no-progress",
            "--budget", str(budget), "--preference", "semseg=2", "depth=1"]
    assert main(argv) == 0
    expected = predictor.predict(rgb, budget=budget, preference={"semseg": 2.0, "depth": 1.0})
    np.testing.assert_array_equal(np.load(out / "a_depth.npy"), expected["depth"])
    np.testing.assert_array_equal(np.load(out / "a_semseg.npy"), expected["semseg"])
    assert not np.allclose(np.load(out / "a_depth.npy"), predictor.predict(rgb)["depth"])
    choice = predictor.select_widths(budget, {"semseg": 2.0, "depth": 1.0}, (64, 96))
    assert f"sub-network {choice.config.describe()}" in capsys.readouterr().err


def test_parse_preference():
    assert parse_preference(["semseg=2", "depth=0.5"]) == {"semseg": 2.0, "depth": 0.5}
    assert parse_preference(None) is None
    for bad in (["semseg"], ["=1"], ["semseg=high"]):
        with pytest.raises(ValueError, match="task=weight"):
            parse_preference(bad)


@pytest.mark.parametrize(("flags", "message"), [
    (["--budget", "1e-9"], "below the smallest sub-network"),
    (["--preference", "semseq=1"], "did you mean 'semseg'"),
    (["--preference", "semseg"], "must look like task=weight"),
    (["--budget", "-2"], "positive number of GFLOPs"),
])
def test_bad_constraints_exit_2_with_one_line(model_dir, tmp_path, capsys, flags, message):
    image = tmp_path / "a.png"
    _write(image)
    argv = ["--model", str(model_dir), "--input", str(image), "--out", str(tmp_path / "o"), "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtv-predict: ") and message in err[0]
