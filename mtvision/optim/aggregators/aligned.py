"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023)."""

from __future__ import annotations

import numpy as np

from mtvision.optim.aggregators.base import Aggregator

SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(Aggregator):
    """Aligned-MTL: with K = V Λ Vᵀ (torch.symeig replaced by an eigh), B = σ V Λ^{-1/2} Vᵀ over the
    eigenvalues above tol, and w = B·1.  The balanced gradients (columns of Gᵀ B) have equal singular
    values σ: σ = √λ_min ('min', default), √(lower median λ) ('median', torch.median's convention) or
    √(mean λ) ('rmse'), as in the official ProcrustesSolver.  tol defaults to the official
    λ_max · T · eps(float32).
    """

    name = "aligned_mtl"

    def __init__(self, scale_mode: str = "min", tol: float | None = None) -> None:
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.tol = tol

    def balance_matrix(self, k: np.ndarray) -> np.ndarray:
        """B for a float64 Gramian `k` (zeros when K = 0)."""
        t = len(k)
        lam, v = np.linalg.eigh(k)
        tol = self.tol if self.tol is not None else float(lam.max()) * t * float(np.finfo(np.float32).eps)
        keep = lam > max(tol, 0.0)
        if not keep.any():
            return np.zeros((t, t))
        lam, v = lam[keep], v[:, keep]
        if self.scale_mode == "min":
            sigma2 = float(lam.min())
        elif self.scale_mode == "median":
            sigma2 = float(np.sort(lam)[(len(lam) - 1) // 2])
        else:
            sigma2 = float(lam.mean())
        return (v * np.sqrt(sigma2 / lam)[None, :]) @ v.T

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        return self.balance_matrix(k).sum(axis=1)
