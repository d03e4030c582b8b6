"""PCGrad (Yu et al. 2020) and GradVac (Wang et al. 2021): sequential per-pair gradient surgery.

Each modified gradient g'_i is tracked as a coefficient vector c_i over the original gradients
(g'_i = c_iᵀG), so every dot product is c_iᵀK e_j and the update Σ_i g'_i has weights Σ_i c_i.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mtvision.optim.aggregators.base import Aggregator, SeededOrder


class PCGrad(Aggregator):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    For each task i, for every other task j in a random order: if g'_i·g_j < 0, project
    g'_i ← g'_i − (g'_i·g_j / ‖g_j‖²) g_j.  The update is Σ_i g'_i (the paper's sum).  The order comes
    from a seeded generator held in the object (a fresh permutation per task and call).
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._order = SeededOrder(self.seed)

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        t = len(k)
        c = np.eye(t)
        for i in range(t):
            for j in self._order.order(t, skip=i):
                dot = c[i] @ k[:, j]
                if dot < 0 and k[j, j] > 0:
                    c[i, j] -= dot / k[j, j]
        return c.sum(axis=0)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._order.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order.load(state["generator"])

    def reset(self) -> None:
        self._order.reset()


class GradVac(Aggregator):
    """Gradient Vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021).

    For each task i and every other task j (random order), with φ_ij = cos(g'_i, g_j) and the EMA
    target φ̂_ij: if φ_ij < φ̂_ij,
        g'_i ← g'_i + ‖g'_i‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j,
    which sets cos(g'_i, g_j) to φ̂_ij; then φ̂_ij ← (1−β) φ̂_ij + β φ_ij.  Targets start at 0 (so
    the first step is PCGrad's projection) and β = 0.01 as in the paper (LibMTL's default is 0.5).
    The paper applies this per layer; here it acts on whatever gradients K was formed from.  A pair
    with a zero gradient, or a target with |φ̂| = 1, is left alone.  The update is Σ_i g'_i.
    """

    name = "gradvac"

    def __init__(self, beta: float = 0.01, seed: int = 0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.seed = int(seed)
        self._order = SeededOrder(self.seed)
        self._targets: np.ndarray | None = None

    @property
    def targets(self) -> np.ndarray | None:
        """The T×T EMA matrix φ̂ (row i: targets of task i against each j), or None before the first call."""
        return None if self._targets is None else self._targets.copy()

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        t = len(k)
        if self._targets is None:
            self._targets = np.zeros((t, t))
        elif self._targets.shape != (t, t):
            raise ValueError(f"GradVac holds targets for {len(self._targets)} tasks, got a {t}×{t} Gramian")
        c = np.eye(t)
        norms = np.sqrt(np.clip(np.diag(k), 0.0, None))
        for i in range(t):
            for j in self._order.order(t, skip=i):
                ni2 = c[i] @ k @ c[i]
                if ni2 <= 0 or norms[j] == 0:
                    continue
                ni = np.sqrt(ni2)
                phi = float(np.clip((c[i] @ k[:, j]) / (ni * norms[j]), -1.0, 1.0))
                target = self._targets[i, j]
                if phi < target and abs(target) < 1.0:
                    root_t = np.sqrt(1.0 - target**2)
                    coef = ni * (target * np.sqrt(1.0 - phi**2) - phi * root_t) / (norms[j] * root_t)
                    c[i, j] += coef
                self._targets[i, j] = (1.0 - self.beta) * target + self.beta * phi
        return c.sum(axis=0)

    def state_dict(self) -> dict[str, Any]:
        targets = None if self._targets is None else torch.from_numpy(self._targets.copy())
        return {"targets": targets, "generator": self._order.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        targets = state["targets"]
        self._targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float64).numpy().copy()
        self._order.load(state["generator"])

    def reset(self) -> None:
        self._targets = None
        self._order.reset()
