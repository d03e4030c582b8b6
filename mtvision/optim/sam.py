"""Sharpness-aware multi-task step: task-based flat regions (Phan et al., "Improving Multi-task
Learning via Seeking Task-based Flat Regions", arXiv 2211.13723).

For each task t, with θ_t = (shared parameters, t's head):

1. g_t = ∇ L_t(θ) (the per-task gradient, as at the calibrator's params level);
2. ε_t = ρ g_t / ‖g_t‖ and g_t^SAM = ∇ L_t(θ + ε_t) (one forward of task t and one backward at the
   perturbed point; buffers such as BatchNorm statistics are restored afterwards);
3. shared parameters: the SAM gradient is split into its loss part g_t and its flatness part
   g_t^SAM − g_t; each group goes through the aggregator on its own (its own Gramian and weights, a
   separate copy of any stateful aggregator) and the update is the sum of the two results;
4. task t's head gets its own SAM gradient g_t^SAM.

Cost: T backward passes, then T forward + T backward passes at the perturbed points (about 2T
backward passes). ρ = 0.05 is SAM's default (Foret et al. 2021); the paper tunes ρ per benchmark.
Under DDP the per-task gradients are averaged across ranks before ε and before each Gramian, so
every rank perturbs and combines identically (`synced_parameters` lists what is already averaged).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtvision.optim.aggregators import Aggregator
from mtvision.optim.calibrator import GradDrop
from mtvision.optim.gradients import (
    CalibrationError,
    CalibrationStats,
    accumulate_grads,
    average_across_ranks,
    calibration_stats,
    flatten,
    gramian,
    split_flat,
    task_order,
)

Recompute = Callable[[str], Tensor]
"""recompute(task) -> that task's loss from a fresh forward at the current parameters."""


class SharpnessAwareCalibrator:
    """Per-task SAM perturbations, loss and flatness parts aggregated separately (see module docs)."""

    level = "params"
    needs_recompute = True

    def __init__(self, model: nn.Module, aggregator: Aggregator, rho: float = 0.05) -> None:
        if isinstance(aggregator, GradDrop):
            raise CalibrationError("the sharpness-aware step needs a Gramian aggregator, not graddrop")
        if not rho > 0:
            raise CalibrationError(f"sam rho must be > 0, got {rho}")
        self.model, self.rho = model, float(rho)
        self.aggregator = aggregator
        self.flat_aggregator = copy.deepcopy(aggregator)  # its own state (GradVac EMA, Nash warm start)
        self.synced_parameters: list[nn.Parameter] = []

    def state_dict(self) -> dict:
        return {"loss": self.aggregator.state_dict(), "flat": self.flat_aggregator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["loss"])
        self.flat_aggregator.load_state_dict(state["flat"])

    def backward(
        self,
        losses: Mapping[str, Tensor],
        features: Sequence[Tensor] = (),
        branches: Sequence[Tensor] = (),
        loss_scale: float = 1.0,
        recompute: Recompute | None = None,
    ) -> CalibrationStats:
        """Fill `.grad` from `losses` (this forward) and `recompute` (fresh forwards of one task);
        `features` and `branches` are not used (the step works on parameters)."""
        if recompute is None:
            raise CalibrationError("the sharpness-aware step needs recompute(task): a fresh forward of one task")
        names = task_order(losses)
        shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        heads = {t: [p for p in self.model.task_parameters(t) if p.requires_grad] for t in names}
        # 1. plain per-task gradients over (shared, own head), averaged across ranks
        plain = []
        for i, t in enumerate(names):
            params = shared + heads[t]
            grads = torch.autograd.grad(losses[t] * loss_scale, params, retain_graph=i < len(names) - 1, allow_unused=True)
            if all(g is None for g in grads[: len(shared)]):
                raise CalibrationError(f"task {t!r} has no gradient path to the shared parameters")
            plain.append(average_across_ranks(flatten(params, grads)) / loss_scale)
        finite = all(bool(torch.isfinite(g).all()) for g in plain)
        # 2. SAM gradients at the per-task perturbed points
        sam = [self._perturbed_gradient(t, shared + heads[t], g, recompute, loss_scale) if finite else g for t, g in zip(names, plain)]
        finite = finite and all(bool(torch.isfinite(g).all()) for g in sam)
        # 3. shared part: loss and flatness groups, each through the aggregator
        n = sum(p.numel() for p in shared)
        loss_rows = torch.stack([g[:n] for g in plain])
        flat_rows = torch.stack([s[:n] - g[:n] for s, g in zip(sam, plain)])
        k_loss = gramian([[row] for row in loss_rows])
        k_flat = gramian([[row] for row in flat_rows])
        if finite:
            w_loss = self.aggregator(k_loss).double()
            w_flat = self.flat_aggregator(k_flat).double()
        else:
            w_loss = w_flat = torch.ones(len(names), dtype=torch.float64)
        update = (w_loss.to(loss_rows) @ loss_rows + w_flat.to(flat_rows) @ flat_rows) * loss_scale
        accumulate_grads(shared, split_flat(update, shared))
        # 4. heads: their own SAM gradient
        for t, s in zip(names, sam):
            accumulate_grads(heads[t], split_flat(s[n:] * loss_scale, heads[t]))
        self.synced_parameters = shared + [p for t in names for p in heads[t]]
        return calibration_stats(names, w_loss, k_loss, finite)

    def _perturbed_gradient(self, task, params, grad, recompute, loss_scale: float) -> Tensor:
        norm = grad.double().norm()
        if not float(norm) > 0:
            return grad.clone()
        eps = split_flat(grad * (self.rho / float(norm)), params)
        saved = [p.detach().clone() for p in params]  # restored exactly (θ + ε − ε is not θ in floats)
        buffers = [b.detach().clone() for b in self.model.buffers()]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e.to(p.dtype))
        try:
            loss = recompute(task)
            grads = torch.autograd.grad(loss * loss_scale, params, allow_unused=True)
            return average_across_ranks(flatten(params, grads)) / loss_scale
        finally:
            with torch.no_grad():
                for p, original in zip(params, saved):
                    p.copy_(original)
                for b, original in zip(self.model.buffers(), buffers):
                    b.copy_(original)

