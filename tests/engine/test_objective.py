import pytest
import torch

from mtvision.engine.objective import MultiTaskObjective, build_objective, compute_losses
from mtvision.optim.weighting import make_weighting
from mtvision.tasks import resolve_tasks


def test_compute_losses_per_task_and_aux_added_to_its_task():
    tasks = resolve_tasks(["depth", "semseg"], {"semseg": 3})
    out = {"depth": torch.full((1, 1, 2, 2), 2.0), "semseg": torch.zeros(1, 3, 2, 2)}
    deep = {"depth": [torch.full((1, 1, 1, 1), 1.0)]}
    batch = {"depth": torch.full((1, 1, 2, 2), 1.5), "semseg": torch.zeros(1, 2, 2, dtype=torch.long)}
    losses = compute_losses(out, batch, tasks, deep, aux_weight=0.5)
    assert set(losses) == {"depth", "semseg"}
    assert losses["depth"].item() == pytest.approx(0.5 + 0.5 * 0.5)  # aux upsampled to 1.0 everywhere: |1 - 1.5|
    assert losses["semseg"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_fixed_loss_weights_then_equal_weighting_is_one_plain_backward():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    objective = MultiTaskObjective(make_weighting("ew", ["a", "b"]), loss_weights={"a": 3.0})
    total = objective.backward({"a": w[0] ** 2, "b": w[1] ** 2}, scale=0.5)
    assert total.item() == pytest.approx(0.5 * (3 * 1 + 4))
    assert w.grad.tolist() == pytest.approx([0.5 * 3 * 2 * 1.0, 0.5 * 2 * 2.0])
    assert objective.consume_log() == {"loss_weight/a": 1.0, "loss_weight/b": 1.0}
    assert objective.consume_log() == {}
    assert not objective.manual_sync and objective.extra_parameters() == []


def test_uncertainty_weighting_gradients_on_the_model_and_on_its_log_variances():
    """UW: total = Σ ½ e^{-s_t} L_t + ½ s_t, so ∂/∂θ = Σ ½ e^{-s_t} ∂L_t/∂θ and ∂/∂s_t = ½ (1 − e^{-s_t} L_t)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    weighting = make_weighting("uw", ["a", "b"])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.0, 1.0]))
    objective = MultiTaskObjective(weighting, loss_weights={"b": 2.0})
    la, lb = w[0] ** 2, 2.0 * w[1] ** 2  # b prescaled by 2
    objective.backward({"a": w[0] ** 2, "b": w[1] ** 2})
    ea, eb = 0.5, 0.5 * torch.exp(torch.tensor(-1.0)).item()
    assert w.grad.tolist() == pytest.approx([ea * 2 * 1.0, eb * 2 * 2 * 2.0])
    assert weighting.log_vars.grad.tolist() == pytest.approx([0.5 - ea * la.item(), 0.5 - eb * lb.item()])


@pytest.mark.parametrize("weighting", ["ew", "uw", "dwa", "gradnorm", "rlw", "gls", "famo", "igb"])
@pytest.mark.parametrize("level", ["features", "params"])
def test_equal_weighting_calibration_hands_the_model_the_weightings_own_gradient(weighting, level):
    """EW calibration must give the model exactly ∂total/∂θ of the weighting alone: the coefficient
    of L_t is ∂total/∂L_t (w_t for most methods, w_t / L_t for IGB's log-losses), not the logged w_t."""
    from mtvision.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder="hps", tasks={"semseg": 3, "depth": None, "normals": None},
                         decoder_options={"neck_channels": 8, "head_channels": 8})
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g)
    targets = {"semseg": torch.randint(0, 3, (2, 32, 32), generator=g), "depth": torch.rand(2, 1, 32, 32, generator=g) + 1,
               "normals": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32, generator=g), dim=1)}
    grads = []
    for calibration in (None, "ew"):
        objective = build_objective(model, list(targets), weighting=weighting, calibration=calibration, level=level,
                                    loss_weights={"depth": 3.0})
        for step in range(2):  # the second call sees the state the first one left (GradNorm's L(0), RLW's draw)
            model.zero_grad(set_to_none=True)
            out = model(images)
            objective.backward({t: model.tasks[t].loss(out.predictions[t], targets[t]) for t in targets}, out, step=step)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    want, got = grads
    assert got.keys() == want.keys()
    scale = max(float(v.abs().max()) for v in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * scale)


def test_task_losses_swap_the_loss_the_objective_trains():
    from mtvision.models.registry import create_model
    from mtvision.tasks import with_loss

    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", decoder="hps", tasks={"depth": None, "normals": None},
                         decoder_options={"neck_channels": 8, "head_channels": 8})
    objective = build_objective(model, ["depth", "normals"], task_losses={"normals": "l1"})
    assert objective.tasks["normals"].pixel_loss is with_loss(model.tasks["normals"], "l1").pixel_loss
    assert objective.tasks["depth"] is model.tasks["depth"]
    assert model.tasks["normals"].pixel_loss is not objective.tasks["normals"].pixel_loss  # the model's own is kept
    with pytest.raises(ValueError, match="does not train"):
        build_objective(model, ["depth"], task_losses={"normals": "l1"})
