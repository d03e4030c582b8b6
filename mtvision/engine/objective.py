"""Per-task losses, and the one place where they become a gradient.

Every training step computes a `dict[task, loss]` and hands it to `objective.backward(losses)`.
`WeightedSum` is the plain weighted sum; loss-weighting and gradient-calibration methods plug in
here by offering the same `backward` / `state_dict` / `load_state_dict` interface, without any
change to the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtvision.tasks import Task


def compute_losses(
    outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], tasks: Mapping[str, Task], aux_weight: float = 1.0
) -> dict[str, Tensor]:
    """Each task's loss on its output; deep-supervision outputs (`outputs['aux'][task]`, a tensor or a
    list of tensors) add `aux_weight` x their loss to the same task's entry."""
    losses: dict[str, Tensor] = {}
    aux = outputs.get("aux", {}) or {}
    for name, task in tasks.items():
        if name not in outputs:
            continue
        target = batch[name]
        loss = task.loss(outputs[name].float(), target)
        extra = aux.get(name, [])
        for pred in extra if isinstance(extra, (list, tuple)) else [extra]:
            if pred.shape[-2:] != target.shape[-2:]:
                pred = torch.nn.functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + aux_weight * task.loss(pred.float(), target)
        losses[name] = loss
    return losses


class WeightedSum:
    """Total loss = Σ_t w_t L_t (w_t = 1 where no weight is given); backward through it."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})

    def total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The weighted sum of `losses`."""
        return sum(self.weights.get(name, 1.0) * loss for name, loss in losses.items())

    def backward(self, losses: Mapping[str, Tensor], scale: float = 1.0, scaler: torch.amp.GradScaler | None = None) -> Tensor:
        """Accumulate the gradient of `scale` x total into `.grad` (through the GradScaler when given)."""
        total = self.total(losses) * scale
        (scaler.scale(total) if scaler is not None else total).backward()
        return total.detach()

    def state_dict(self) -> dict[str, float]:
        return dict(self.weights)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.weights = dict(state)
