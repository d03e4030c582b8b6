"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mtvision.optim.aggregators.base import Aggregator, min_norm_weights, normalized


def nash_alpha(k: np.ndarray, init: np.ndarray | None = None, tol: float = 1e-13, max_iter: int = 100) -> np.ndarray:
    """The Nash bargaining weights: α > 0 with Kα = 1/α (i.e. α_t (Kα)_t = 1 for every t).

    Kα − 1/α is the gradient of the strictly convex f(α) = ½ αᵀKα − Σ log α_t, so α is its unique
    minimiser; it exists iff 0 is outside the convex hull of the gradients (some direction improves
    every task).  Solved by Newton's method for self-concordant functions (damped steps 1/(1+λ)), warm-started from `init`, on K
    scaled to unit mean diagonal (α scales back by 1/√s).  Callers must ensure existence.
    """
    kn, s = normalized(k)
    a = None if init is None else np.asarray(init, dtype=np.float64) * np.sqrt(s)
    if a is None or not (np.isfinite(a).all() and (a > 0).all()):
        a = 1.0 / np.sqrt(np.diag(kn))  # the solution for orthogonal gradients
    a = a * np.sqrt(len(k) / float(a @ kn @ a))  # the best point on the ray through a

    for _ in range(max_iter):
        grad = kn @ a - 1.0 / a
        step = np.linalg.solve(kn + np.diag(1.0 / a**2), grad)
        lam = np.sqrt(max(float(grad @ step), 0.0))  # Newton decrement
        if lam < tol:
            break
        # f is self-concordant: the damped step 1/(1 + λ) stays in α > 0 and decreases f; full
        # Newton steps (quadratic convergence) once λ < 1/4
        a = a - (1.0 if lam < 0.25 else 1.0 / (1.0 + lam)) * step
        if np.abs(a * (kn @ a) - 1.0).max() < tol:
            break
    return a / np.sqrt(s)


class NashMTL(Aggregator):
    """Nash-MTL: the weights α solving Kα = 1/α (the Nash bargaining solution of the tasks).

    The official code reaches α through a sequence of convex problems (cvxpy/ECOS, 20 iterations); the
    fixed point is the same α, found here by `nash_alpha` (damped Newton on a strictly convex
    function, warm-started from the previous α held in the object, cold-started from α_t = 1/‖g_t‖;
    both rescaled to the best point on their ray).  α is recomputed every
    `update_weights_every` calls and reused in between.  With max_norm > 0 the weights are scaled so
    ‖Σ α_t g_t‖ ≤ max_norm, as the official `clip_grad_norm_` does (factor max_norm/(‖d‖ + 1e-6)).
    `optim_niter` bounds the Newton iterations (the official code's outer iterations).
    `update_weights_every` = N > 1 is the paper's cheaper variant (α solved every N steps, the
    weighted loss Σ α_t L_t used in between): on the steps in between `reuse` offers α, so the
    calibrator backpropagates Σ α_t L_t once instead of forming per-task gradients (the max-norm
    factor then comes from that gradient's norm, `reused`).
    Deviations, where the bargaining problem has no solution: tasks with a zero gradient get weight 0;
    if 0 is still in the hull of the rest's unit gradients (tasks in direct conflict) the equation is
    solved for K + 1e-3·diag(K), a well-posed nearby problem.
    """

    name = "nash_mtl"

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        if update_weights_every < 1 or optim_niter < 1:
            raise ValueError("update_weights_every and optim_niter must be >= 1")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self._alpha: np.ndarray | None = None
        self._step = 0

    @property
    def alpha(self) -> np.ndarray | None:
        """The last α (before max-norm scaling), or None."""
        return None if self._alpha is None else self._alpha.copy()

    def _compute_alpha(self, k: np.ndarray) -> np.ndarray:
        t = len(k)
        d = np.diag(k)
        live = np.flatnonzero(d > 1e-24 * max(float(d.max()), 1e-300))
        alpha = np.zeros(t)
        if len(live) == 0:
            return alpha
        kk = k[np.ix_(live, live)]
        # existence does not depend on the gradients' norms: test the hull of the unit gradients
        n = np.sqrt(np.diag(kk))
        kn = kk / np.outer(n, n)
        w = min_norm_weights(kn)
        if float(w @ kn @ w) < 1e-10:
            kk = kk + 1e-3 * np.diag(n**2)
        init = None
        if self._alpha is not None and len(self._alpha) == t and (self._alpha[live] > 0).all():
            init = self._alpha[live]
        alpha[live] = nash_alpha(kk, init=init, max_iter=max(self.optim_niter, 1))
        return alpha

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        t = len(k)
        stale = self._alpha is None or len(self._alpha) != t
        if stale or self._step % self.update_weights_every == 0:
            self._alpha = self._compute_alpha(k)
        self._step += 1
        w = self._alpha.copy()
        if self.max_norm > 0:
            norm = np.sqrt(max(float(w @ k @ w), 0.0))
            w *= min(1.0, self.max_norm / (norm + 1e-6))
        return w

    def reuse(self, num_tasks: int) -> np.ndarray | None:
        fresh = self._alpha is None or len(self._alpha) != num_tasks or self._step % self.update_weights_every == 0
        return None if fresh else self._alpha.copy()

    def reused(self, norm: float) -> float:
        self._step += 1
        return min(1.0, self.max_norm / (norm + 1e-6)) if self.max_norm > 0 else 1.0

    def state_dict(self) -> dict[str, Any]:
        alpha = None if self._alpha is None else torch.from_numpy(self._alpha.copy())
        return {"alpha": alpha, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alpha = state["alpha"]
        self._alpha = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float64).numpy().copy()
        self._step = int(state["step"])

    def reset(self) -> None:
        self._alpha = None
        self._step = 0
