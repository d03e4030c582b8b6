"""The contract of methods that keep per-task gradients across steps (gradient tracking): the T×P
per-task gradients of the shared parameters and the T losses -> the update direction.

Such a method cannot be a Gramian aggregator: its direction or weights depend on past gradients
coordinate by coordinate (MoCo's and DB-MTL's tracked gradients, ExcessMTL's squared-gradient
sums), so it needs the gradients themselves, in coordinates that mean the same thing at every step.
That holds for the shared parameters only, so these methods work at the calibrator's "params"
level: there the per-task gradients are averaged across ranks before the method sees them (and the
calibrator averages the loss values too), so every rank holds the same state and computes the same
direction, which equals one process's on the concatenated batch.  At the "features" level the
coordinates are the current batch's activations (other images at every step, split across ranks),
so a buffer carried from one step to the next would add up gradients of unrelated pixels; the
calibrator refuses them there.

State lives in the object as tensors (`state_dict`), T×P buffers included (the shared parameters'
size per task).  A non-finite step never reaches `combine` (the calibrator falls back to the summed
gradient and the step is skipped), so it changes no state.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor


class GradientTracker:
    """Base class: `combine(grads, losses)` -> (direction, weights to report).

    grads: T×P per-task gradients of the shared parameters (unscaled, averaged across ranks);
    losses: the T loss values they are gradients of.  With one task there is nothing to balance:
    the direction is the task's gradient and no state moves.  Subclasses implement `_combine`.
    """

    name: ClassVar[str] = ""

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """(the P-vector update direction, T weights for logging)."""
        if grads.ndim != 2 or grads.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} needs a T×P gradient matrix, got shape {tuple(grads.shape)}")
        losses = torch.as_tensor(losses).detach().reshape(-1).to(grads.device, torch.float64)
        if losses.shape[0] != grads.shape[0]:
            raise ValueError(f"expected {grads.shape[0]} losses, got {losses.shape[0]}")
        if grads.shape[0] == 1:
            return grads[0].clone(), torch.ones(1, dtype=torch.float64)
        direction, weights = self._combine(grads.detach(), losses)
        return direction, weights.detach().double().cpu()

    def _combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_tasks(self, buffer: Tensor | None, grads: Tensor) -> None:
        if buffer is not None and buffer.shape != grads.shape:
            raise ValueError(
                f"{type(self).__name__} holds state of shape {tuple(buffer.shape)}, got gradients of shape "
                f"{tuple(grads.shape)} (a different model or task list)"
            )

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def tensor_or_none(value: Any, like: Tensor | None = None) -> Tensor | None:
    """`value` as a tensor (a copy; None stays None), on `like`'s device when given."""
    if value is None:
        return None
    out = torch.as_tensor(value).clone()
    return out if like is None else out.to(like.device)
