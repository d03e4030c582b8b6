"""ExcessMTL (He, Zhou, Zhao, Hong & Yang, "Robust Multi-Task Learning with Excess Risks",
ICML 2024; as in the authors' LibMTL implementation, `ExcessMTL`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtvision.optim.tracked.base import GradientTracker, tensor_or_none


class ExcessMTL(GradientTracker):
    """ExcessMTL: task weights moved by each task's estimated excess risk (distance to its optimum),
    not by its loss, so that noisy tasks with a high irreducible loss do not take over.

    The excess risk of task t is estimated as e_t = g_tᵀ H_t⁻¹ g_t with the diagonal AdaGrad
    curvature H_t = √(Σ_steps g_t² + 1e-7) (element-wise, accumulated over all steps so far).  The
    first step records e⁰; later steps update the weights multiplicatively,
        w_t ← w_t · exp(η e_t / e⁰_t),   then w ← T w / Σ w
    (η = `robust_step_size` = 1e-2, LibMTL's default), and the update is Σ_t w_t g_t with the new
    weights (w starts at 1).  A task whose first estimate is 0 (a zero gradient) has no reference
    and keeps its weight's ratio term at 0.  The reported weights are w.  State: Σ g² (T×P), e⁰, w.
    """

    name = "excess_mtl"

    def __init__(self, robust_step_size: float = 1e-2) -> None:
        if not (math.isfinite(robust_step_size) and robust_step_size >= 0):
            raise ValueError(f"robust_step_size must be a finite number >= 0, got {robust_step_size}")
        self.robust_step_size = float(robust_step_size)
        self._grad_sq: Tensor | None = None
        self._initial: Tensor | None = None
        self._weights: Tensor | None = None

    def _combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        self._check_tasks(self._grad_sq, grads)
        t = grads.shape[0]
        g_sq = grads * grads
        self._grad_sq = g_sq if self._grad_sq is None else self._grad_sq + g_sq
        excess = (g_sq / torch.sqrt(self._grad_sq + 1e-7)).double().sum(dim=1).cpu()
        weights = torch.ones(t, dtype=torch.float64) if self._weights is None else self._weights
        if self._initial is None:
            self._initial = excess
        else:
            ratio = torch.where(self._initial > 0, excess / self._initial.clamp_min(1e-300), torch.zeros_like(excess))
            weights = weights * torch.exp(self.robust_step_size * ratio)
            weights = weights / weights.sum() * t
        self._weights = weights
        return weights.to(grads) @ grads, weights.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": tensor_or_none(self._grad_sq), "initial": tensor_or_none(self._initial),
                "weights": tensor_or_none(self._weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grad_sq = tensor_or_none(state["grad_sq"])
        self._initial = tensor_or_none(state["initial"])
        self._weights = tensor_or_none(state["weights"])

    def reset(self) -> None:
        self._grad_sq = self._initial = self._weights = None
