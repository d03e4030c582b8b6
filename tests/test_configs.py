"""Every shipped experiment config loads strictly and describes a buildable model config."""

from pathlib import Path

import pytest

from mtvision.config import ExperimentConfig, load_config
from mtvision.models.config import ModelConfig

# every experiment config (branching specs under configs/*/specs/ are not experiments: tests/search)
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if "specs" not in p.parts and "search" not in p.parts)


def test_there_are_configs_for_each_dataset():
    folders = {p.parent.name for p in CONFIGS}
    assert {"synthetic", "nyud", "pascal"} <= folders


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_and_model_section_parses(path):
    cfg = load_config(ExperimentConfig, path)
    cfg.validate()
    model = cfg.model.resolved(cfg.data.tasks, {}, (cfg.data.height, cfg.data.width))
    assert isinstance(model, ModelConfig) and list(model.tasks) == cfg.data.tasks
    if cfg.data.dataset != "synthetic":
        # real datasets select models on a hold-out, never on the test split; the releases' protocol
        # (full train split, no validation, the last iteration) selects nothing
        release_protocol = cfg.data.val_split is None and cfg.data.holdout_fraction == 0 and cfg.train.select == "last"
        assert cfg.data.holdout_fraction > 0 or release_protocol, "no selection on the test split"
        assert cfg.data.val_split != cfg.data.test_split
        from_scratch = model.backbone.name == "segnet"  # the NYUv2-13 optimiser benchmark trains its SegNet from scratch
        assert from_scratch or model.backbone.pretrained or (model.backbone.weights and model.backbone.pretrained is not False), (
            "real-data recipes start from pretrained weights: timm's tag through the hub cache or a local file"
        )
