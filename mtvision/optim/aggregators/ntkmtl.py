"""NTKMTL (Qin, Wang, Liao & Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from
Neural Tangent Kernel Perspective", NeurIPS 2025)."""

from __future__ import annotations

import math

import numpy as np

from mtvision.optim.aggregators.base import Aggregator, zero_tasks


class NTKMTL(Aggregator):
    """NTKMTL with one sample per task (the paper's n = 1, the form its experiments use): task t's
    NTK is the scalar K_tt = ‖g_t‖², its largest eigenvalue λ_t = K_tt, and the weights
    w_t = (Σ_i λ_i / λ_t)^p slow the fast-converging tasks down to the slow ones' pace.

    As in the official code (jianke0604/NTKMTL): the update is T·Σ_t w_t g_t (its `overwrite_grad`
    scales by the number of tasks) and, with max_norm > 0, it is scaled to ‖d‖ ≤ max_norm (its
    `clip_grad_norm_` of the shared parameters).  p = `ntk_exp` = 0.5 is the code's default; its
    NYUv2 script uses 0.75.  Tasks with a zero gradient (λ_t = 0, where the release divides by
    zero) get weight 0.  Not implemented: NTKMTL with n > 1 samples per task (per-sample
    gradients; "for reference, not used in experiments" in the release) and NTKMTL-SR (per-sample
    gradients at the shared representation): both need per-sample losses, which the model's
    pixel-averaged task losses do not expose.
    """

    name = "ntkmtl"

    def __init__(self, ntk_exp: float = 0.5, max_norm: float = 1.0) -> None:
        if not (math.isfinite(ntk_exp) and ntk_exp >= 0):
            raise ValueError(f"ntk_exp must be a finite number >= 0, got {ntk_exp}")
        if not max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0 (0: no clipping), got {max_norm}")
        self.ntk_exp = float(ntk_exp)
        self.max_norm = float(max_norm)

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        t = len(k)
        lam = np.diag(k)
        w = np.zeros(t)
        if np.trace(k) > 0:
            live = ~zero_tasks(k)
            w[live] = t * (lam.sum() / lam[live]) ** self.ntk_exp
        if self.max_norm > 0:
            norm = math.sqrt(max(float(w @ k @ w), 0.0))
            w *= min(1.0, self.max_norm / (norm + 1e-6))
        return w
