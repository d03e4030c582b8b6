"""MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023; as in LibMTL's `MoCo`,
written from the authors' code)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtvision.optim.tracked.base import GradientTracker, tensor_or_none


class MoCo(GradientTracker):
    """MoCo: track each task's gradient, then correct the direction with simplex weights λ.

    At the k-th step, with h_t = L_t g_t / (‖g_t‖ + 1e-8) (LibMTL's normalised, loss-scaled
    gradients):
        y_t ← y_t − β_k (y_t − h_t),                         β_k = β / k^{σ_β}
        λ ← softmax(λ − γ_k (Y Yᵀ + ρ I) λ),                 γ_k = γ / k^{σ_γ}
    and the update is Yᵀλ (the tracked gradients, not the current ones).  y starts at 0 and λ at
    1/T.  Defaults are LibMTL's: β = 0.5, σ_β = 0.5, γ = 0.1, σ_γ = 0.5, ρ = 0.  (The paper
    projects λ onto the simplex; the authors' code, which LibMTL follows, takes a softmax.)  The
    reported weights are λ.  State: Y (T×P), λ and k.
    """

    name = "moco"

    def __init__(
        self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0
    ) -> None:
        if not 0 < beta <= 1 or not gamma > 0 or beta_sigma < 0 or gamma_sigma < 0 or rho < 0:
            raise ValueError(
                f"MoCo needs beta in (0, 1], gamma > 0 and beta_sigma, gamma_sigma, rho >= 0; got "
                f"beta={beta}, beta_sigma={beta_sigma}, gamma={gamma}, gamma_sigma={gamma_sigma}, rho={rho}"
            )
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self._y: Tensor | None = None
        self._lambda: Tensor | None = None
        self._step = 0

    def _combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        self._check_tasks(self._y, grads)
        t = grads.shape[0]
        self._step += 1
        norms = grads.double().norm(dim=1)
        h = grads * (losses / (norms + 1e-8)).to(grads.dtype)[:, None]
        y = torch.zeros_like(grads) if self._y is None else self._y
        self._y = y - (self.beta / self._step**self.beta_sigma) * (y - h)
        lam = torch.full((t,), 1.0 / t, dtype=torch.float64) if self._lambda is None else self._lambda
        yy = (self._y.double() @ self._y.double().T).cpu() + self.rho * torch.eye(t, dtype=torch.float64)
        self._lambda = torch.softmax(lam - (self.gamma / self._step**self.gamma_sigma) * (yy @ lam), dim=0)
        return self._lambda.to(grads) @ self._y, self._lambda.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"y": tensor_or_none(self._y), "lambda": tensor_or_none(self._lambda), "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._y = tensor_or_none(state["y"])
        lam = tensor_or_none(state["lambda"])
        self._lambda = None if lam is None else lam.to(torch.float64)
        self._step = int(state["step"])

    def reset(self) -> None:
        self._y, self._lambda, self._step = None, None, 0
