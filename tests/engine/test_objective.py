import pytest
import torch

from mtvision.engine.objective import WeightedSum, compute_losses
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


def test_weighted_sum_backward_matches_manual_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    objective = WeightedSum({"a": 3.0})
    total = objective.backward({"a": w[0] ** 2, "b": w[1] ** 2}, scale=0.5)
    assert total.item() == pytest.approx(0.5 * (3 * 1 + 4))
    assert w.grad.tolist() == pytest.approx([0.5 * 3 * 2 * 1.0, 0.5 * 2 * 2.0])
    objective.load_state_dict({"b": 0.0})
    assert objective.state_dict() == {"b": 0.0}
