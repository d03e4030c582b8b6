"""`mtv-predict`: pictures and arrays for an image or a folder, clear failures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import mtvision
from mtvision.cli.predict import main
from mtvision.models import create_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(
        backbone="test_resnet",
        tasks={"semseg": 5, "depth": None, "normals": None},
        decoder_options={"neck_channels": 16, "head_channels": 8},
    )
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return path


def _write(path, h, w, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def test_folder_of_images_gives_pictures_and_arrays(model_dir, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    a = _write(images / "a.png", 40, 52, 0)
    _write(images / "b.png", 33, 47, 1)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert (
        main(
            ["--model", str(model_dir), "--input", str(images), "--out", str(out), "--npy", "--panel", "--no-progress"]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    expected = sorted(f"{s}_{t}.{e}" for s in "ab" for t in ("semseg", "depth", "normals") for e in ("png", "npy"))
    assert names == sorted(expected + ["a_panel.png", "b_panel.png"])
    # the arrays are the predictor's output for the image as read from disk
    want = mtvision.load(model_dir).predict(a)
    for t in want:
        np.testing.assert_allclose(np.load(out / f"a_{t}.npy"), want[t], atol=1e-5)
    semseg_png = cv2.imread(str(out / "a_semseg.png"))
    expected_rgb = mtvision.visualize.colorize_labels(want["semseg"])
    # the map at the image's size, then its legend on the right (white background)
    assert semseg_png.shape[0] == 40 and semseg_png.shape[1] > 52
    assert np.array_equal(semseg_png[:, :52, ::-1], expected_rgb)
    plain = tmp_path / "plain"
    assert main(["--model", str(model_dir), "--input", str(images / "a.png"), "--out", str(plain), "--no-key", "--no-progress"]) == 0
    assert np.array_equal(cv2.imread(str(plain / "a_semseg.png"))[..., ::-1], expected_rgb)


def test_single_image_and_task_subset(model_dir, tmp_path):
    _write(tmp_path / "x.jpg", 30, 30, 2)
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                str(model_dir),
                "--input",
                str(tmp_path / "x.jpg"),
                "--out",
                str(out),
                "--tasks",
                "depth",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["x_depth.png"]


def test_failures_are_clear(model_dir, tmp_path, capsys):
    assert main(["--model", str(model_dir), "--input", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    _write(tmp_path / "y.png", 20, 20, 3)
    assert (
        main(["--model", str(tmp_path / "missing"), "--input", str(tmp_path / "y.png"), "--out", str(tmp_path / "o")])
        == 2  # a --model that is no model: a usage error
    )
    assert "not a pretrained folder" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                str(model_dir),
                "--input",
                str(tmp_path / "y.png"),
                "--out",
                str(tmp_path / "o"),
                "--tasks",
                "dpth",
            ]
        )
        == 2  # an unknown task: a usage error
    )
    assert "did you mean 'depth'" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxxxx")
    assert main(["--model", str(model_dir), "--input", str(tmp_path / "broken.png"), "--out", str(tmp_path / "o")]) == 1
    assert "broken.png" in capsys.readouterr().err
