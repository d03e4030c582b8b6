"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), the gradient part of IMTL."""

from __future__ import annotations

import numpy as np

from mtvision.optim.aggregators.base import Aggregator


class IMTLG(Aggregator):
    """IMTL-G: weights α with Σα = 1 such that d = Σ_t α_t g_t has equal projections d·u_t on every
    unit gradient u_t = g_t/‖g_t‖.  Closed form with D = [g1−g2, …, g1−gT] and U = [u1−u2, …]:
    α_{2..T} = g1 Uᵀ (D Uᵀ)⁻¹, α1 = 1 − Σα_{2..T}, using g_a·u_b = K_ab/√K_bb.

    When D Uᵀ is singular (e.g. parallel gradients, where every α already satisfies the condition)
    the minimum-norm least-squares solution is used.  Tasks with a zero gradient have no direction:
    they get weight 0 and the others are solved among themselves.
    """

    name = "imtl_g"

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        t = len(k)
        n = np.sqrt(np.clip(np.diag(k), 0.0, None))
        live = np.flatnonzero(n > 1e-12 * max(float(n.max()), 1e-300))
        alpha = np.zeros(t)
        if len(live) == 0:
            return np.full(t, 1.0 / t)
        if len(live) == 1:
            alpha[live] = 1.0
            return alpha
        kk = k[np.ix_(live, live)]
        nn = n[live]
        # g_a · u_b for all a, b
        gu = kk / nn[None, :]
        r = gu[0, 0] - gu[0, 1:]  # g1·(u1 − u_b)
        m = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]  # (g1−g_a)·(u1−u_b)
        a_rest = np.linalg.lstsq(m.T, r, rcond=None)[0]
        alpha[live] = np.concatenate([[1.0 - a_rest.sum()], a_rest])
        return alpha
