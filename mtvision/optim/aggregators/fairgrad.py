"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024)."""

from __future__ import annotations

import math

import numpy as np

from mtvision.optim.aggregators.base import Aggregator, min_norm_weights, normalized, zero_tasks


def fair_weights(k: np.ndarray, alpha: float, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """The α-fair allocation: w > 0 with K w = w^(−1/α) (element-wise), for a Gramian `k`.

    (Kw)_t = g_tᵀd is task t's rate of improvement along d = Σ w_t g_t, and K w = w^(−1/α) is the
    stationarity condition of the α-fair utility Σ_t u_α(g_tᵀd) over ‖d‖ ≤ 1.  It is also the
    gradient of f(w) = ½ wᵀKw − Σ_t φ(w_t), with φ = log for α = 1 and φ(w) = w^(1−1/α)/(1−1/α)
    otherwise; f is strictly convex on w > 0 (its Hessian K + diag(w^(−1/α−1)/α) is positive
    definite), so w is its unique minimiser, which exists iff 0 is outside the hull of the
    gradients.  Solved by Newton's method with a backtracking line search that keeps w > 0, on K
    scaled to unit mean diagonal (w scales back by s^(−α/(1+α))).  α = 1 is Nash-MTL's equation;
    α → ∞ tends to K w = 1, equal rates for every task.  For α > 1 a task whose rate exceeds the
    others' gets w_t = (Kw)_t^(−α), which can lie below any float64 number: a weight that falls
    under 1e-20 of the largest is set to 0 (its share of d is below float64 precision) and the
    rest are solved among themselves.  Callers must ensure existence.
    """
    kn, s = normalized(k)
    p = 1.0 / alpha
    w = np.diag(kn) ** (-alpha / (1.0 + alpha))  # the solution for orthogonal gradients
    free = np.ones(len(w), dtype=bool)

    def f(x: np.ndarray) -> float:
        util = np.log(x).sum() if p == 1.0 else (x ** (1.0 - p)).sum() / (1.0 - p)
        return 0.5 * float(x @ kf @ x) - float(util)

    for _ in range(max_iter):
        idx = np.flatnonzero(free)
        kf, x = kn[np.ix_(idx, idx)], w[idx]
        grad = kf @ x - x ** (-p)
        if np.abs(grad * x**p).max() < tol:  # relative residual of (Kw)_t = w_t^(-1/α)
            break
        step = np.linalg.solve(kf + np.diag(p * x ** (-p - 1.0)), grad)
        decrement = float(grad @ step)
        t = 1.0
        shrink = step > 0
        if shrink.any():  # the largest step that keeps every w_t > 0, with a margin
            t = min(1.0, 0.99 * float(np.min(x[shrink] / step[shrink])))
        if decrement >= 1e-8:  # damped phase: backtrack until f decreases enough
            value = f(x)
            while f(x - t * step) > value - 0.25 * t * decrement and t > 1e-12:
                t *= 0.5
            if f(x - t * step) > value:  # no further decrease in float64
                break
        w[idx] = x - t * step  # (near the solution: full Newton steps, quadratic convergence)
        if p < 1.0:
            tiny = free & (w < 1e-20 * w.max())
            if tiny.any() and tiny.sum() < free.sum():
                w[tiny], free[tiny] = 0.0, False
    return w * s ** (-alpha / (1.0 + alpha))


class FairGrad(Aggregator):
    """FairGrad: the α-fair weights w > 0 solving K w = w^(−1/α) (`fair_weights`), multiplied by T.

    As in the official code (OptMN-Lab/fairgrad): the update is T·Σ_t w_t g_t (its `overwrite_grad`
    scales by the number of tasks "to match the sum loss") and, with max_norm > 0, it is scaled so
    ‖Σ_t w_t g_t‖ ≤ max_norm, as its `clip_grad_norm_` of the shared parameters does (factor
    max_norm/(‖d‖ + 1e-6)).  α = 1 (the code's default) is proportional fairness, the same
    weights as Nash-MTL; the release's NYUv2 and Cityscapes scripts use α = 2.  The official code
    solves the equation with scipy's bounded least squares from w = 1/T; `fair_weights` solves it
    exactly by Newton's method.  Where the equation has no solution (as for Nash-MTL): tasks with
    a zero gradient get weight 0; if 0 is in the hull of the others' unit gradients, the equation
    is solved for K + 1e-3·diag(K).
    """

    name = "fairgrad"

    def __init__(self, alpha: float = 1.0, max_norm: float = 1.0) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"FairGrad alpha must be a finite number > 0, got {alpha!r}")
        if not max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0 (0: no clipping), got {max_norm}")
        self.alpha = float(alpha)
        self.max_norm = float(max_norm)

    def fair(self, k: np.ndarray) -> np.ndarray:
        """The α-fair weights (before the factor T and the max-norm scaling); 0 for zero gradients."""
        t = len(k)
        w = np.zeros(t)
        live = np.flatnonzero(~zero_tasks(k)) if np.trace(k) > 0 else np.array([], dtype=int)
        if len(live) == 0:
            return w
        kk = k[np.ix_(live, live)]
        n = np.sqrt(np.diag(kk))
        unit = kk / np.outer(n, n)
        mn = min_norm_weights(unit)
        if float(mn @ unit @ mn) < 1e-10:
            kk = kk + 1e-3 * np.diag(n**2)
        w[live] = fair_weights(kk, self.alpha)
        return w

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        w = len(k) * self.fair(k)
        if self.max_norm > 0:
            norm = math.sqrt(max(float(w @ k @ w), 0.0))
            w *= min(1.0, self.max_norm / (norm + 1e-6))
        return w
