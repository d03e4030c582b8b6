"""DB-MTL (Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023; the authors'
implementation is LibMTL's `DB_MTL`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtvision.optim.tracked.base import GradientTracker, tensor_or_none


class DBMTL(GradientTracker):
    """DB-MTL: loss-scale balancing by log losses, gradient-magnitude balancing to the largest.

    1. g_t = ∇ log(L_t + ε) = ∇L_t / (L_t + ε), ε = 1e-8 (the loss scale no longer matters);
    2. an EMA of them, ĝ_t ← g_t + (β / k^σ)(ĝ_t − g_t) at the k-th step (ĝ starts at 0;
       β = 0.9, σ = `beta_sigma` = 0: LibMTL's defaults);
    3. the update Σ_t α_t ĝ_t with α_t = max_i ‖ĝ_i‖ / (‖ĝ_t‖ + 1e-8): every task's tracked
       gradient is scaled to the largest norm.

    L_t is the loss the calibrator receives (after `loss_weights` and the loss weighting); the
    log makes any constant factor on it irrelevant, so DB-MTL composes with EW and needs no
    "log" weighting.  The reported weights are α.  State: ĝ (T×P) and k.
    """

    name = "db_mtl"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> None:
        if not 0 <= beta < 1 or not beta_sigma >= 0 or not eps >= 0:
            raise ValueError(f"DB-MTL needs beta in [0, 1), beta_sigma >= 0, eps >= 0; got {beta}, {beta_sigma}, {eps}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self._buffer: Tensor | None = None
        self._step = 0

    def _combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        self._check_tasks(self._buffer, grads)
        self._step += 1
        log_grads = grads / (losses + self.eps).to(grads.dtype)[:, None]
        buffer = torch.zeros_like(grads) if self._buffer is None else self._buffer
        self._buffer = log_grads + (self.beta / self._step**self.beta_sigma) * (buffer - log_grads)
        norms = self._buffer.double().norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        return alpha.to(grads.dtype) @ self._buffer, alpha

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": tensor_or_none(self._buffer), "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buffer = tensor_or_none(state["buffer"])
        self._step = int(state["step"])

    def reset(self) -> None:
        self._buffer, self._step = None, 0
