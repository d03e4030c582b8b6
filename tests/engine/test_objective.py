import pytest
import torch

from mtvision.engine.objective import MultiTaskObjective, compute_losses
from mtvision.optim.weighting import make_weighting
from mtvision.tasks import resolve_tasks


def test_compute_losses_per_task_and_aux_added_to_its_task():
    tasks = resolve_tasks(["depth", "semseg"], {"semseg": 3})
    out = {
        "depth": torch.full((1, 1, 2, 2), 2.0),
        "semseg": torch.zeros(1, 3, 2, 2),
        "aux": {"depth": [torch.full((1, 1, 1, 1), 1.0)]},
    }
    batch = {"depth": torch.full((1, 1, 2, 2), 1.5), "semseg": torch.zeros(1, 2, 2, dtype=torch.long)}
    losses = compute_losses(out, batch, tasks, aux_weight=0.5)
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
