"""MGDA (Sener & Koltun 2018) and UPGrad (Quinton & Rey 2024): quadratic programs in the Gramian."""

from __future__ import annotations

import numpy as np

from mtvision.optim.aggregators.base import Aggregator, min_norm_weights, nonneg_qp, zero_tasks

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(Aggregator):
    """MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

    w = argmin_{w ≥ 0, Σw = 1} ‖Σ_t w_t ĝ_t‖², the min-norm point of the convex hull of the
    (normalised) gradients ĝ_t = g_t / n_t, solved exactly (closed form for T = 2, an active-set NNLS
    otherwise).  normalization (LibMTL's `mgda_gn`): 'none' n_t = 1; 'l2' n_t = ‖g_t‖; 'loss'
    n_t = L_t; 'loss+' n_t = L_t·‖g_t‖.  The loss modes need `losses=` in `weights`.  As in the
    authors' code the weights multiply the original (unnormalised) gradients.  A zero gradient is
    left unnormalised (n_t = 1), so the hull contains 0 and the update is 0.
    """

    name = "mgda"

    def __init__(self, normalization: str = "none") -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        n = np.ones(len(k))
        if self.normalization in ("l2", "loss+"):
            n = n * np.sqrt(np.clip(np.diag(k), 0.0, None))
        if self.normalization in ("loss", "loss+"):
            if losses is None:
                raise ValueError(f"MGDA normalization {self.normalization!r} needs weights(K, losses=...)")
            if not (np.isfinite(losses).all() and (losses > 0).all()):
                raise ValueError(f"MGDA normalization {self.normalization!r} needs finite positive losses")
            n = n * losses
        n = np.where(n > 0, n, 1.0)
        return min_norm_weights(k / np.outer(n, n))


class UPGrad(Aggregator):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; torchjd's default).

    Each g_t is projected onto the dual cone {v : G v ≥ 0} of the gradients and the projections are
    averaged.  The projection of g_t is Gᵀ(e_t + μ_t) with μ_t = argmin_{μ ≥ 0} ½ μᵀKμ + μᵀK e_t
    (the dual of min ‖v − g_t‖² s.t. G v ≥ 0), solved exactly by NNLS; w = (1/T) Σ_t (e_t + μ_t).
    Unlike torchjd, K is not regularised (torchjd adds 1e-4·I after normalising K).
    """

    name = "upgrad"

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        # The cone {v : G v >= 0} does not change when the rows of G are rescaled, so the QPs are
        # solved on unit-norm rows (K̂ = D⁻¹KD⁻¹, better conditioned): μ = D⁻¹ μ̂ with
        # μ̂ = argmin_{μ̂ ≥ 0} ½ μ̂ᵀK̂μ̂ + μ̂ᵀK̂ (n_t e_t).  A zero gradient's constraint is 0 >= 0:
        # it is left out of the QPs (its own projection is 0, coefficient e_t).
        t = len(k)
        live = np.flatnonzero(~zero_tasks(k))
        w = np.full(t, 1.0 / t)
        if len(live) == 0:
            return w
        n = np.sqrt(np.diag(k)[live])
        kn = k[np.ix_(live, live)] / np.outer(n, n)
        eye = np.eye(len(live))
        for i in range(len(live)):
            w[live] += nonneg_qp(kn, n[i] * eye[i]) / n / t
        return w
