"""`mtv-train` with the 3D-aware regulariser on the synthetic scenes: the run trains the rendered
maps, checkpoints the regulariser and exports the plain model."""

from __future__ import annotations

import torch

from mtvision.engine.checkpoint import CheckpointManager, load_checkpoint
from mtvision.engine.trainer import train
from mtvision.models.multitask import MultiTaskModel
from tests.engine.test_trainer import tiny_config


def test_a_tiny_run_with_the_regulariser(tmp_path):
    import mtvision

    out = tmp_path / "run"
    cfg = tiny_config(out, train={"iterations": 2, "eval_interval": 2}, model={"regularizer3d": {"samples": 8}})
    result = train(cfg, device="cpu")
    assert result.step == 2 and result.skipped_steps == 0
    state = load_checkpoint(CheckpointManager(out).latest())["model"]
    reg = [k for k in state if k.startswith("regularizer3d.")]
    assert reg and all(torch.isfinite(state[k]).all() for k in reg)
    predictor = mtvision.load(out / "model")  # the exported folder is the plain model
    assert type(predictor.model) is MultiTaskModel
    assert not any(k.startswith("regularizer3d.") for k in predictor.model.state_dict())
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, state[k]), k  # the trained decoder, unchanged
