"""GradientCalibrator against hand-assembled per-task gradients on a tiny HPS model."""

from __future__ import annotations

import pytest
import torch

from mtvision.models.registry import create_model
from mtvision.optim.aggregators import make_aggregator, min_norm_weights
from mtvision.optim.calibrator import CalibrationError, GradientCalibrator

TASKS = {"semseg": 3, "depth": None, "normals": None}


def tiny(decoder: str = "hps"):
    torch.manual_seed(0)
    model = create_model(
        backbone="test_resnet", decoder=decoder, tasks=TASKS, decoder_options={"neck_channels": 16, "head_channels": 8}
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = {
        "semseg": torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2)),
        "depth": torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)) + 1,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)), dim=1),
    }
    return model, images, targets


def losses_of(model, images, targets):
    out = model(images)
    return {t: model.tasks[t].loss(out[t], targets[t]) for t in TASKS}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def summed_loss_grads(model, images, targets):
    model.zero_grad(set_to_none=True)
    sum(losses_of(model, images, targets).values()).backward()
    return grads(model)


@pytest.mark.parametrize("level", ["features", "params"])
def test_equal_weights_reproduce_the_summed_loss_gradient(level):
    model, images, targets = tiny()
    want = summed_loss_grads(model, images, targets)
    model.zero_grad(set_to_none=True)
    stats = GradientCalibrator(model, make_aggregator("ew"), level).backward(losses_of(model, images, targets))
    got = grads(model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert stats.weights == {"semseg": 1.0, "depth": 1.0, "normals": 1.0}


def test_features_level_mgda_matches_a_hand_assembled_update():
    model, images, targets = tiny()
    losses = losses_of(model, images, targets)
    reps = model.shared_representation()
    g = [torch.autograd.grad(losses[t], reps, retain_graph=True)[0] for t in TASKS]
    flat = torch.stack([x.reshape(-1).double() for x in g])
    k = flat @ flat.T
    w = torch.as_tensor(min_norm_weights(k.numpy()))
    shared = list(model.shared_parameters())
    want_shared = torch.autograd.grad(reps, shared, grad_outputs=[sum(float(wi) * gi for wi, gi in zip(w, g))], retain_graph=True)
    want_heads = {t: torch.autograd.grad(losses[t], list(model.task_parameters(t)), retain_graph=True) for t in TASKS}

    model.zero_grad(set_to_none=True)
    stats = GradientCalibrator(model, make_aggregator("mgda"), "features").backward(losses)
    torch.testing.assert_close(stats.gramian, k, rtol=1e-10, atol=0)
    assert [stats.weights[t] for t in TASKS] == pytest.approx(w.tolist(), rel=1e-9)
    assert abs(sum(stats.weights.values()) - 1) < 1e-9 and min(stats.weights.values()) < 0.99  # really reweighted
    for p, want in zip(shared, want_shared):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)
    for t in TASKS:  # heads keep their own task's plain gradient, whatever the weights
        for p, want in zip(model.task_parameters(t), want_heads[t]):
            torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-9)
    norms = stats.gramian.diagonal().sqrt()
    torch.testing.assert_close(stats.cosines, stats.gramian / torch.outer(norms, norms))


def test_params_level_pcgrad_gramian_is_over_the_shared_parameters():
    model, images, targets = tiny()
    losses = losses_of(model, images, targets)
    shared = list(model.shared_parameters())
    flat = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)]).double() for t in TASKS]
    )
    model.zero_grad(set_to_none=True)
    stats = GradientCalibrator(model, make_aggregator("pcgrad"), "params").backward(losses)
    torch.testing.assert_close(stats.gramian, flat @ flat.T, rtol=1e-10, atol=0)
    w = torch.tensor([stats.weights[t] for t in TASKS], dtype=torch.float64)
    combined = (w[:, None] * flat).sum(0)
    got = torch.cat([p.grad.reshape(-1) for p in shared]).double()
    torch.testing.assert_close(got, combined, rtol=1e-5, atol=1e-8)


def test_bad_input_is_a_clear_error():
    model, images, targets = tiny()
    with pytest.raises(CalibrationError, match="unknown calibration level"):
        GradientCalibrator(model, make_aggregator("ew"), "layers")
    losses = losses_of(model, images, targets)
    losses["depth"] = losses["depth"] * float("nan")
    with pytest.raises(CalibrationError, match="non-finite loss for task"):
        GradientCalibrator(model, make_aggregator("ew")).backward(losses)
    with pytest.raises(CalibrationError, match="at least one task"):
        GradientCalibrator(model, make_aggregator("ew")).backward({})
    stitched, images, targets = tiny("cross_stitch")
    with pytest.raises(CalibrationError, match="level='params'"):
        GradientCalibrator(stitched, make_aggregator("ew")).backward(losses_of(stitched, images, targets))
