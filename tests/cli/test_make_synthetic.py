"""mtv-make-synthetic as a user runs it: the help's examples, and shipped PASCAL and NYUD recipes trained
end to end on the layouts it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtvision.cli.evaluate import main as eval_main
from mtvision.cli.make_synthetic import build_parser
from mtvision.cli.make_synthetic import main as make_main
from mtvision.cli.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
PASCAL_TASKS = {"semseg", "parts", "saliency", "normals", "edge"}

# a recipe made tiny: a test backbone from scratch, 48x48 crops, 2 iterations, no workers, plain console
TINY_OVERRIDES = [
    "data.height=48", "data.width=48", "data.num_workers=0", "data.pin_memory=false",
    "model.backbone.name=test_resnet", "model.backbone.pretrained=false", "model.backbone.out_indices=null",
    "model.backbone.kwargs={}", "model.backbone.drop_path_rate=null",
    "train.epochs=null", "train.iterations=2", "train.batch_size=2", "train.eval_interval=2", "train.amp=none",
    "logging.log_interval=1", "logging.console=plain", "logging.num_val_images=1",
]


def test_help_shows_an_example_for_each_layout():
    text = build_parser().format_help()
    assert "--layout {nyud,pascal}" in text and "default nyud" in text
    assert "mtv-make-synthetic --out data/NYUDv2" in text
    assert "mtv-make-synthetic --layout pascal --out data/PASCAL_MT" in text
    for recipe in ("configs/nyud/hps_vitl16_448x576.yaml", "configs/pascal/hps_vitl16_512x512.yaml"):
        assert f"mtv-train {recipe}" in text and (REPO / recipe).is_file()


def test_unknown_layout_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        make_main(["--out", str(tmp_path / "x"), "--layout", "cityscapes"])
    assert exc.value.code == 2 and "invalid choice: 'cityscapes'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    ["hps_vitl16_512x512", "hps_vitl16_512x512_3d", "invpt_vitl16_512x512", "invpt_vitl16_512x512_3d",
     "mmoe_vitl16_512x512", "taps_resnet18_512x512", "taskexpert_vitl16_512x512", "dsmtl_resnet18_512x512",
     "dsmtl_compact_resnet18_512x512", "controllable_resnet34_512x512"],
)
def test_pascal_recipe_trains_and_evaluates_on_the_synthetic_pascal_tree(tmp_path, recipe):
    root = tmp_path / "PASCAL_MT"
    argv = ["--layout", "pascal", "--out", str(root), "--num", "8", "--height", "48", "--width", "48", "--seed", "2",
            "--val-fraction", "0.25", "--no-progress", "--preview-rows", "0"]
    assert make_main(argv) == 0
    run = tmp_path / "run"
    config = str(REPO / "configs" / "pascal" / f"{recipe}.yaml")
    assert train_main([config, "--device", "cpu", f"output_dir={run}", f"data.root={root}", *TINY_OVERRIDES]) == 0
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["tasks"] == {"semseg": 21, "parts": 7, "saliency": None, "normals": None, "edge": None}
    out = tmp_path / "metrics.json"
    assert eval_main([str(run), "--split", "test", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == PASCAL_TASKS
    assert report["split"] == "val"  # the recipes' test split is PASCAL's official val list


@pytest.fixture(scope="module")
def nyud_tree(tmp_path_factory):
    """A synthetic NYUD-v2 tree at the releases' 425 x 560, the size whose Kinect camera is known."""
    root = tmp_path_factory.mktemp("nyud") / "NYUDv2"
    argv = ["--out", str(root), "--num", "6", "--height", "425", "--width", "560", "--seed", "3",
            "--val-fraction", "0.34", "--no-progress", "--preview-rows", "0"]
    assert make_main(argv) == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    ["dsmtl_resnet50_448x576", "dsmtl_compact_resnet50_448x576", "hps_vitl16_448x576_3d", "invpt_vitl16_448x576_3d",
     "controllable_resnet34_448x576"],
)
def test_nyud_recipe_trains_and_evaluates_on_the_synthetic_nyud_tree(tmp_path, nyud_tree, recipe):
    run = tmp_path / "run"
    config = str(REPO / "configs" / "nyud" / f"{recipe}.yaml")
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("data.height", "data.width"))]  # the recipe's 448x576
    assert train_main([config, "--device", "cpu", f"output_dir={run}", f"data.root={nyud_tree}", *tiny]) == 0
    saved = json.loads((run / "model" / "config.json").read_text())
    assert set(saved["tasks"]) == {"semseg", "depth", "normals", "edge"}
    out = tmp_path / "metrics.json"
    assert eval_main([str(run), "--split", "test", "--out", str(out), "--device", "cpu"]) == 0
    assert set(json.loads(out.read_text())["metrics"]) == {"semseg", "depth", "normals", "edge"}
