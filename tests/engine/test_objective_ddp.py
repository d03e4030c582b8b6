"""Under DDP a model-level regularizer (the MoE balancing loss) is averaged like every other gradient,
also for the parameters whose calibrated gradient is averaged inside the calibrator (params level,
the sharpness-aware step), and one rank's non-finite loss makes every rank skip the weighting's state."""

from __future__ import annotations

import torch

from mtvision.engine.objective import build_objective
from mtvision.models.registry import create_model
from tests.gloo import run_on_ranks

TASKS = {"semseg": 3, "depth": None}
CASES = {"params": {"calibration": "mgda", "level": "params"},
         "sam": {"calibration": "ew", "level": "params", "sam_rho": 0.05},
         "features": {"calibration": "mgda", "level": "features"}}


def _setup():
    torch.manual_seed(0)
    model = create_model(backbone="test_convnext", decoder="hps", tasks=TASKS,
                         decoder_options={"neck_channels": 8, "head_channels": 8, "norm": "gn"})
    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 32, 32, generator=g)
    targets = {"semseg": torch.randint(0, 3, (4, 32, 32), generator=g), "depth": torch.rand(4, 1, 32, 32, generator=g) + 1}
    return model, images, targets


def _gradients(rows: slice, reg_factors: list[float]) -> dict[str, torch.Tensor]:
    """Each case's gradients on samples `rows`, with regularizer Σ_f f·‖θ_backbone‖² averaged over `reg_factors`."""
    model, images, targets = _setup()
    out = {}
    for name, options in CASES.items():
        objective = build_objective(model, list(TASKS), **options)
        model.zero_grad(set_to_none=True)
        objective.zero_grad()
        for factor in reg_factors:  # one process stands in for both ranks' regularizers by averaging them
            pred = model(images[rows])
            losses = {t: model.tasks[t].loss(pred.predictions[t], targets[t][rows]) for t in TASKS}
            reg = factor * sum(p.pow(2).sum() for p in model.decoder.backbone.parameters())

            def recompute(t, rows=rows):
                return model.tasks[t].loss(model(images[rows], tasks=[t]).predictions[t], targets[t][rows])

            output = pred._replace(regularizers={"l2": reg})
            objective.backward(losses, output, scale=1.0 / len(reg_factors), recompute=recompute)
        objective.sync_gradients(model)
        for n, p in model.named_parameters():
            if p.grad is not None:
                out[f"{name}/{n}"] = p.grad.detach().contiguous().clone()
    return out


def test_regularizer_gradients_are_averaged_and_ranks_agree(tmp_path):
    r0, r1 = run_on_ranks(lambda rank: _gradients(slice(2 * rank, 2 * rank + 2), [0.1 * (rank + 1)]), 2, tmp_path)
    assert r0.keys() == r1.keys()
    for key in r0:  # both ranks step with the same gradient
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    # and it is the one-process gradient of the whole batch with the mean of the two regularizers
    want = _gradients(slice(0, 4), [0.15])
    assert want.keys() == r0.keys()
    for key in want:
        # the SAM gradient is taken at a perturbed point that float rounding moves slightly: its small
        # entries move by up to ~1e-4 of the largest (see tests/optim/test_sam.py)
        atol = 1e-4 * max(float(v.abs().max()) for k, v in want.items() if k.startswith("sam/")) if key.startswith("sam/") else 1e-6
        torch.testing.assert_close(r0[key], want[key], rtol=1e-4, atol=atol, msg=lambda m, key=key: f"{key}: {m}")
