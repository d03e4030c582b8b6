"""torch.compile with the methods that read the model output's shared tensors (features and FULLER
calibration, GradNorm) gives the gradients of eager mode: the shared representation and the branch
points are graph boundaries, real autograd nodes between the shared part and the task parts."""

from __future__ import annotations

import pytest
import torch

from mtvision.engine.objective import build_objective, compute_losses
from mtvision.models.registry import create_model

TASKS = {"semseg": 3, "depth": None, "normals": None}
CASES = {
    "features-mgda": {"calibration": "mgda", "level": "features"},
    "fuller-ew": {"calibration": "ew", "level": "fuller"},
    "gradnorm": {"weighting": "gradnorm"},
    "params-pcgrad": {"calibration": "pcgrad", "level": "params"},
}


def _setup():
    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder="hps", tasks=TASKS,
                         decoder_options={"neck_channels": 8, "head_channels": 8, "norm": "gn"})
    g = torch.Generator().manual_seed(1)
    # 64 x 64: the stride-32 level is 2 x 2, so group norm there is not degenerate and every branch
    # carries a gradient (FULLER rescales each branch to the mean norm)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = {"semseg": torch.randint(0, 3, (2, 64, 64), generator=g), "depth": torch.rand(2, 1, 64, 64, generator=g) + 1,
               "normals": torch.nn.functional.normalize(torch.randn(2, 3, 64, 64, generator=g), dim=1)}
    return model, images, targets


def _gradients(model, forward, images, targets, options) -> dict[str, torch.Tensor]:
    objective = build_objective(model, list(TASKS), **options)
    out = {}
    for step in range(2):  # the second step sees GradNorm's initial losses and the aggregators' state
        model.zero_grad(set_to_none=True)
        output = forward(images)
        losses = compute_losses(output.predictions, targets, model.tasks)
        objective.backward(losses, output, step=step)
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[name] = p.grad.detach().clone()
    for name, p in objective.weighting.named_parameters():
        if p.grad is not None:
            out[f"weighting.{name}"] = p.grad.detach().clone()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_model_gives_the_eager_gradients(case):
    torch._dynamo.reset()
    model, images, targets = _setup()
    want = _gradients(model, model, images, targets, CASES[case])
    model, images, targets = _setup()
    compiled = torch.compile(model, backend="aot_eager")
    got = _gradients(model, compiled, images, targets, CASES[case])
    assert got.keys() == want.keys() and len(want) > 10
    scale = max(float(v.abs().max()) for v in want.values())  # compiled kernels sum in another order
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}")


def test_the_shared_tensors_of_a_compiled_forward_are_autograd_nodes():
    """Without the graph boundary, a compiled graph returns its intermediate tensors as outputs that
    no loss depends on; with it, each task's loss reaches them."""
    torch._dynamo.reset()
    model, images, targets = _setup()
    output = torch.compile(model, backend="aot_eager")(images)
    losses = compute_losses(output.predictions, targets, model.tasks)
    for t, loss in losses.items():
        grads = torch.autograd.grad(loss, output.shared + output.branches, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), t


@pytest.mark.slow
def test_training_with_compile_and_features_calibration_runs(tmp_path):
    """The whole run compiled with the default (inductor) backend; slow on CPU (C++ code generation)."""
    from mtvision.engine.trainer import train
    from tests.engine.test_trainer import tiny_config

    cfg = tiny_config(tmp_path / "run", optim={"calibration": {"method": "mgda"}, "weighting": {"method": "gradnorm"}},
                      train={"compile": True, "iterations": 2, "eval_interval": 2})
    result = train(cfg, device="cpu")
    assert result.step == 2 and result.skipped_steps == 0
