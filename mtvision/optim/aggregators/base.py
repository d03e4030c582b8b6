"""The aggregator contract: a map from the T×T Gramian K = G·Gᵀ of the task gradients to T weights.

The combined update is d = Σ_t w_t g_t = wᵀG.  Every method here sees only K (dot products), so it
works unchanged for parameter-level and feature-level gradients and under DDP (K = Σ_ranks K_rank).
Solves run in float64 NumPy; weights come back in the Gramian's dtype and device.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor


def check_gramian(gramian: Tensor) -> np.ndarray:
    """`gramian` as a symmetric float64 array; ValueError when it is not a finite symmetric T×T matrix."""
    if not isinstance(gramian, Tensor):
        raise ValueError(f"the Gramian must be a torch.Tensor, got {type(gramian).__name__}")
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"the Gramian must be a non-empty square T×T matrix, got shape {tuple(gramian.shape)}")
    k = gramian.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(k).all():
        raise ValueError("the Gramian has non-finite entries (NaN or inf gradients?)")
    eps = torch.finfo(gramian.dtype).eps if gramian.dtype.is_floating_point else torch.finfo(torch.float32).eps
    tol = np.sqrt(eps) * max(float(np.abs(k).max()), np.finfo(np.float64).tiny)
    if np.abs(k - k.T).max() > tol:
        raise ValueError(f"the Gramian is not symmetric (max |K - Kᵀ| = {np.abs(k - k.T).max():.3g})")
    if np.diag(k).min() < -tol:
        raise ValueError("the Gramian has a negative diagonal entry: it is not G·Gᵀ of real gradients")
    return 0.5 * (k + k.T)


def normalized(k: np.ndarray) -> tuple[np.ndarray, float]:
    """K / s with s = trace(K)/T (the mean squared gradient norm), and s; s = 0 for an all-zero K."""
    s = float(np.trace(k)) / len(k)
    return (k / s, s) if s > 0 else (k, 0.0)


def zero_tasks(k: np.ndarray) -> np.ndarray:
    """Mask of tasks whose gradient is zero (K_tt ≤ 1e-24 · max K_tt, i.e. a norm ratio below 1e-12)."""
    d = np.diag(k)
    return d <= 1e-24 * max(float(d.max()), 0.0)


def sqrt_factor(k: np.ndarray) -> np.ndarray:
    """A with AᵀA = K (PSD part of K, through its eigendecomposition)."""
    lam, v = np.linalg.eigh(k)
    return np.sqrt(np.clip(lam, 0.0, None))[:, None] * v.T


def min_norm_weights(k: np.ndarray) -> np.ndarray:
    """argmin of wᵀKw over the simplex: the min-norm point of the convex hull of the gradients.

    T = 2 in closed form.  T > 2 exactly through one non-negative least-squares problem: with
    λ = argmin_{λ ≥ 0} ‖Gᵀλ‖² + (1 − Σλ)², w = λ/Σλ (the KKT conditions of the two problems coincide:
    g_tᵀd ≥ ‖d‖² with equality on the support), solved by Lawson–Hanson active sets.
    """
    t = len(k)
    kn, s = normalized(k)
    if s == 0.0:
        return np.full(t, 1.0 / t)
    zero = zero_tasks(kn)
    if zero.any():  # 0 is in the hull: put all weight on the first zero gradient
        return np.eye(t)[int(np.argmax(zero))]
    if t == 2:
        den = kn[0, 0] + kn[1, 1] - 2.0 * kn[0, 1]
        gamma = 0.5 if den <= 1e-15 else float(np.clip((kn[1, 1] - kn[0, 1]) / den, 0.0, 1.0))
        return np.array([gamma, 1.0 - gamma])
    a = np.vstack([sqrt_factor(kn), np.ones((1, t))])
    b = np.zeros(t + 1)
    b[-1] = 1.0
    lam, _ = nnls(a, b, maxiter=50 * t)
    return lam / lam.sum()


def nonneg_qp(k: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmin_{μ ≥ 0} ½ μᵀKμ + μᵀK c (a linear term in the range of K), exactly by NNLS on ‖A(μ + c)‖²."""
    a = sqrt_factor(k)
    mu, _ = nnls(a, -a @ c, maxiter=50 * len(k))
    return mu


class Aggregator:
    """Base class: `weights(K)` maps the Gramian of T task gradients to T weights.

    Subclasses implement `_solve(k, losses)` on a checked, symmetric float64 array with T ≥ 2; with a
    single task there is nothing to balance and the weights are [1].  Stateful subclasses override
    `state_dict`, `load_state_dict` and `reset`; state is plain Python numbers, lists and tensors.
    """

    name: ClassVar[str] = ""

    def weights(self, gramian: Tensor, *, losses: Tensor | None = None) -> Tensor:
        """Task weights w (length T) such that the update is d = Σ_t w_t g_t.

        losses: the T current loss values, used only by methods that normalise by them (MGDA 'loss').
        """
        k = check_gramian(gramian)
        t = len(k)
        lv = None
        if losses is not None:
            lv = np.asarray(torch.as_tensor(losses).detach().to("cpu", torch.float64).reshape(-1).numpy())
            if lv.shape != (t,):
                raise ValueError(f"expected {t} losses, got {lv.shape[0]}")
        w = np.ones(1) if t == 1 else self._solve(k, lv)
        out_dtype = gramian.dtype if gramian.dtype.is_floating_point else torch.float32
        return torch.as_tensor(w, dtype=torch.float64).to(device=gramian.device, dtype=out_dtype)

    def __call__(self, gramian: Tensor, *, losses: Tensor | None = None) -> Tensor:
        return self.weights(gramian, losses=losses)

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def reuse(self, num_tasks: int) -> np.ndarray | None:
        """The weights this call will apply without looking at the Gramian (a method that
        recomputes its weights only every N calls, between two updates), or None when it needs K.

        A caller that gets weights may skip the per-task gradients: it applies the weights to the
        summed gradient Σ_t w_t g_t (one backward pass) and then calls `reused` with that
        gradient's norm.  It does not change the state."""
        return None

    def reused(self, norm: float) -> float:
        """Record a call that applied `reuse`'s weights, with ‖Σ_t w_t g_t‖ = `norm`; returns the
        factor the caller must multiply those weights by (max-norm scaling)."""
        raise NotImplementedError(f"{type(self).__name__} never reuses its weights")

    def state_dict(self) -> dict[str, Any]:
        """The checkpointable state (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless, got state keys {sorted(state)}")

    def reset(self) -> None:
        """Forget any state (start of a new run)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class EqualWeights(Aggregator):
    """Equal weighting: w = 1, the plain sum of the task gradients (the baseline)."""

    name = "ew"

    def _solve(self, k: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        return np.ones(len(k))


class SeededOrder:
    """A seeded torch generator for random task orders, with checkpointable state."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def order(self, t: int, skip: int) -> list[int]:
        """A random permutation of range(t) without `skip`."""
        return [j for j in torch.randperm(t, generator=self.generator).tolist() if j != skip]

    def state(self) -> Tensor:
        return self.generator.get_state()

    def load(self, state: Tensor) -> None:
        self.generator.set_state(torch.as_tensor(state, dtype=torch.uint8))

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)
