"""Gradient calibration: per-task gradients -> Gramian -> aggregator weights -> combined `.grad`.

`GradientCalibrator(model, aggregator, level).backward(losses)` leaves in every parameter's `.grad`
what `optimizer.step()` needs (DESIGN.md, Calibrator contract):

- level "features" (default): the per-task gradients g_t are taken with respect to the model's
  shared representation (`model.shared_representation()`, the tensors every task's loss flows
  through).  T cheap backward passes through the task heads give the g_t, K = G Gᵀ, the
  aggregator turns K into weights w, and one backward pass of Σ_t w_t g_t through the shared part
  fills the shared parameters' gradients: about one backward pass in all.
- level "params": the g_t are taken over the shared parameters themselves (T backward passes
  through the whole network); the shared parameters get Σ_t w_t g_t.

Task-specific parameters (the heads) always get their own task's plain gradient ∂L_t/∂θ_t.

Not yet done (issue 5): DDP (features: all-reduce of K; params: averaging g_t across ranks before
K), AMP loss scaling, FULLER's multi-level calibration, the sharpness-aware step and the wiring
into `mtv-train`.  Until then this is a single-process library piece.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtvision.errors import MTVisionError
from mtvision.optim.aggregators import Aggregator

LEVELS = ("features", "params")


class CalibrationError(MTVisionError, ValueError):
    """The model, losses or level do not allow gradient calibration."""


@dataclass
class CalibrationStats:
    """What one calibrated backward pass saw: task weights, the Gramian and pairwise cosines."""

    weights: dict[str, float]
    gramian: Tensor
    cosines: Tensor


def _task_order(losses: Mapping[str, Tensor]) -> list[str]:
    if not losses:
        raise CalibrationError("calibration needs at least one task loss")
    bad = [t for t, v in losses.items() if not torch.isfinite(v.detach()).all()]
    if bad:
        raise CalibrationError(f"non-finite loss for task(s) {bad}: skip this step instead of calibrating it")
    return list(losses)


def _accumulate(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


def _stats(names: list[str], weights: Tensor, gramian: Tensor) -> CalibrationStats:
    norms = gramian.diagonal().clamp_min(0).sqrt()
    cosines = gramian / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    return CalibrationStats({n: float(w) for n, w in zip(names, weights)}, gramian.detach().cpu(), cosines.detach().cpu())


class GradientCalibrator:
    """Combine per-task gradients through `aggregator` (a Gramian -> weights map) at `level`."""

    def __init__(self, model: nn.Module, aggregator: Aggregator, level: str = "features") -> None:
        if level not in LEVELS:
            raise CalibrationError(f"unknown calibration level {level!r} (valid: {', '.join(LEVELS)})")
        for method in ("shared_parameters", "task_parameters", "shared_representation"):
            if not hasattr(model, method):
                raise CalibrationError(f"the model has no {method}(); calibrate a mtvision MultiTaskModel")
        self.model, self.aggregator, self.level = model, aggregator, level

    def backward(self, losses: Mapping[str, Tensor]) -> CalibrationStats:
        """Fill `.grad` of every parameter from the per-task `losses` of the last forward pass."""
        names = _task_order(losses)
        heads = {t: [p for p in self.model.task_parameters(t) if p.requires_grad] for t in names}
        if self.level == "features":
            return self._features(names, losses, heads)
        return self._params(names, losses, heads)

    def _features(self, names, losses, heads) -> CalibrationStats:
        reps = [r for r in self.model.shared_representation() if r.requires_grad]
        if not reps:
            raise CalibrationError(
                "the model exposes no shared representation (e.g. cross-stitch): use level='params'"
            )
        per_task = []
        for t in names:
            grads = torch.autograd.grad(losses[t], reps + heads[t], retain_graph=True, allow_unused=True)
            rep_grads, head_grads = grads[: len(reps)], grads[len(reps) :]
            if all(g is None for g in rep_grads):
                raise CalibrationError(f"task {t!r} has no gradient path to the shared representation")
            per_task.append([torch.zeros_like(r) if g is None else g for r, g in zip(reps, rep_grads)])
            _accumulate(heads[t], head_grads)
        weights, gramian, combined = self._combine(per_task)
        torch.autograd.backward(reps, grad_tensors=combined)  # through the shared part only
        return _stats(names, weights, gramian)

    def _params(self, names, losses, heads) -> CalibrationStats:
        shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        per_task = []
        for i, t in enumerate(names):
            grads = torch.autograd.grad(
                losses[t], shared + heads[t], retain_graph=i < len(names) - 1, allow_unused=True
            )
            per_task.append([torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads[: len(shared)])])
            _accumulate(heads[t], grads[len(shared) :])
        weights, gramian, combined = self._combine(per_task)
        _accumulate(shared, combined)
        return _stats(names, weights, gramian)

    def _combine(self, per_task: list[list[Tensor]]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(weights, Gramian K = G Gᵀ, Σ_t w_t g_t per tensor) from each task's list of gradient tensors."""
        flat = torch.stack([torch.cat([g.reshape(-1) for g in gs]).double() for gs in per_task])
        gramian = flat @ flat.T
        weights = self.aggregator(gramian).to(flat.dtype)
        combined = [sum(float(w) * gs[i] for w, gs in zip(weights, per_task)) for i in range(len(per_task[0]))]
        return weights, gramian, combined
