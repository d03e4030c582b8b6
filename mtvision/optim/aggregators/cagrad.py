"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from mtvision.optim.aggregators.base import Aggregator, normalized, zero_tasks


class CAGrad(Aggregator):
    """CAGrad: d = g0 + (√φ/‖g_w‖) g_w with g0 the average gradient, φ = c²‖g0‖² and
    w = argmin_{w ∈ simplex} g_wᵀg0 + √φ ‖g_w‖ (the dual of max_d min_t g_tᵀd s.t. ‖d − g0‖ ≤ √φ).

    The dual is solved with SLSQP (analytic gradients, tight tolerance).  rescale as in the official
    code: 0 returns d, 1 (default) d/(1 + c²), 2 d/(1 + c).  c = 0.4 is the paper's NYUv2 value.
    Tasks with a zero gradient are left out of the dual (their g_t·d ≡ 0 does not depend on d; g0
    still averages over all T).  When ‖g_w‖ = 0 at the optimum the direction term is dropped.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}")
        self.c = float(c)
        self.rescale = int(rescale)

    def dual_weights(self, k: np.ndarray) -> np.ndarray:
        """The simplex weights w of the dual problem for a float64 Gramian `k`."""
        t = len(k)
        kn, s = normalized(k)
        if s == 0.0:
            return np.full(t, 1.0 / t)
        live = np.flatnonzero(~zero_tasks(kn))
        b = np.full(t, 1.0 / t)
        kb = (kn @ b)[live]
        r = self.c * np.sqrt(max(float(b @ kn @ b), 0.0))
        kl = kn[np.ix_(live, live)]

        def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
            kw = kl @ w
            nw = np.sqrt(max(float(w @ kw), 1e-30))
            return float(w @ kb + r * nw), kb + r * kw / nw

        m = len(live)
        cons = {"type": "eq", "fun": lambda w: np.sum(w) - 1.0, "jac": lambda w: np.ones_like(w)}
        res = minimize(fun, np.full(m, 1.0 / m), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                       constraints=[cons], options={"ftol": 1e-14, "maxiter": 200})
        w = np.zeros(t)
        w[live] = np.clip(res.x, 0.0, None)
        return w / w.sum()

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        t = len(k)
        b = np.full(t, 1.0 / t)
        w = self.dual_weights(k)
        g0_norm = np.sqrt(max(float(b @ k @ b), 0.0))
        gw_norm = np.sqrt(max(float(w @ k @ w), 0.0))
        scale = np.sqrt(max(float(np.trace(k)) / t, 0.0))
        lam = self.c * g0_norm / gw_norm if gw_norm > 1e-12 * scale else 0.0
        d = b + lam * w
        return d / (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]
