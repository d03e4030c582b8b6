"""Gradient calibration: per-task gradients -> Gramian -> aggregator weights -> combined `.grad`.

`GradientCalibrator(model, aggregator, level).backward(losses, features=..., branches=...)` leaves
in every parameter's `.grad` what `optimizer.step()` needs:

- level "features" (default): the per-task gradients g_t are taken with respect to `features`, the
  shared representation of the forward that produced `losses` (the model output's `shared`: the
  tensors every task's loss flows through).  T cheap backward passes through the task heads give the g_t, K = G Gᵀ, the
  aggregator turns K into weights w, and one backward pass of Σ_t w_t g_t through the shared part
  fills the shared parameters' gradients: about one backward pass in all.  Shared parameters that
  lie after the representation (cross-task attention or distillation modules feeding several
  heads) get Σ_t w_t ∂L_t/∂θ with the same weights.
- level "params": the g_t are taken over the shared parameters themselves (T backward passes
  through the whole network); the shared parameters get Σ_t w_t g_t.
- level "fuller" (FULLER's multi-level calibration, Huang et al. ICCV 2023, adapted to dense
  prediction): task level as "features"; then the combined gradient is carried down to the
  branch tensors (`branches`, the model output's branch points: the per-scale backbone features
  that feed the neck), each branch's gradient is rescaled to the mean of the branches' gradient norms, and only
  then does it flow on into the backbone.

Task-specific parameters (the heads) always get their own task's plain gradient ∂L_t/∂θ_t.

Besides Gramian aggregators and GradDrop, the method can be a gradient-tracking method
(`mtvision.optim.tracked`: DB-MTL, MoCo, ExcessMTL), which needs the per-task gradients themselves
and keeps state over them: it works at the "params" level only (see that package for why).  An
aggregator that reuses its weights between updates (Nash-MTL with `update_weights_every` > 1)
skips the per-task gradients on the steps in between: one backward pass of Σ_t w_t L_t at either
level, about the cost of plain equal weighting.

DDP (the model must be run under `no_sync`; the caller then averages every gradient except
`synced_parameters` across ranks, as `MultiTaskObjective` does):

- features: the ranks' representations are disjoint coordinates of one global vector and each
  rank's loss is 1/R of the global one, so K = Σ_r K_r / R² with one T×T all-reduce; every rank gets
  the same weights, backpropagates Σ w_t g_t locally, and the averaged parameter gradients equal the
  single-process ones on the concatenated batch.  FULLER all-reduces its branch norms too.
- params: the per-task gradients are averaged across ranks (one T×P all-reduce) before K.

AMP: `backward(losses, loss_scale=s)` backpropagates s·L_t (GradScaler's scale), forms K from the
unscaled gradients and leaves the gradients scaled, for `scaler.unscale_` / `scaler.step`.  A
non-finite loss or gradient makes `stats.finite` False: the weights fall back to ones, no
aggregator state moves, and the step must be skipped (GradScaler skips it by itself; the trainer
skips it otherwise).  All ranks still take part in every collective, so DDP never hangs.

Gradient accumulation calibrates each micro-batch on its own (the aggregator is nonlinear, and the
features level would otherwise have to keep every micro-batch's graph alive).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtvision import distributed as dist
from mtvision.errors import unknown_name
from mtvision.optim.aggregators import AGGREGATORS, Aggregator, make_aggregator
from mtvision.optim.aggregators.graddrop import graddrop
from mtvision.optim.gradients import (
    CalibrationError,
    CalibrationStats,
    accumulate_grads,
    calibration_stats,
    flatten,
    gramian,
    split_flat,
    task_order,
    upstream_parameters,
)
from mtvision.optim.tracked import TRACKED, GradientTracker, make_tracker

LEVELS = ("features", "params", "fuller")
METHODS = (*AGGREGATORS, *TRACKED, "graddrop")
"""Every calibration method name: Gramian aggregators, gradient trackers and GradDrop."""

__all__ = ["LEVELS", "METHODS", "CalibrationError", "CalibrationStats", "GradDrop", "GradientCalibrator", "make_calibration_method"]


class GradDrop:
    """GradDrop as a calibration method (element-wise; see `aggregators.graddrop`).

    At the features level it acts on the shared activation with the paper's batch-shared masks; at
    the params level on each shared parameter's per-task gradients.  The uniform draws come from a
    generator seeded with `seed`, identical on every rank.
    """

    name = "graddrop"

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int = 0) -> None:
        self.leak, self.seed = leak, int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def __repr__(self) -> str:
        return f"GradDrop(leak={self.leak!r}, seed={self.seed})"


Method = Aggregator | GradDrop | GradientTracker


def check_level(method: Method, level: str) -> None:
    """CalibrationError when `method` cannot run at `level` (gradient trackers need "params")."""
    if level not in LEVELS:
        raise CalibrationError(f"unknown calibration level {level!r} (valid: {', '.join(LEVELS)})")
    if isinstance(method, GradientTracker) and level != "params":
        raise CalibrationError(
            f"{method.name!r} keeps per-task gradients from step to step, which needs coordinates that mean the "
            f"same thing at every step: the shared parameters. Use level 'params' (at level {level!r} the "
            "gradients are the current batch's activations)"
        )


class GradientCalibrator:
    """Combine per-task gradients through `method` (a Gramian -> weights aggregator, `GradDrop`, or a
    gradient tracker at the params level) at `level`."""

    def __init__(self, model: nn.Module, aggregator: Method, level: str = "features") -> None:
        check_level(aggregator, level)
        for method in ("shared_parameters", "task_parameters"):
            if not hasattr(model, method):
                raise CalibrationError(f"the model has no {method}(); calibrate a mtvision MultiTaskModel")
        self.model, self.aggregator, self.level = model, aggregator, level
        self.synced_parameters: list[nn.Parameter] = []  # gradients already averaged across ranks

    # ------------------------------------------------------------------------------------ public
    def backward(
        self,
        losses: Mapping[str, Tensor],
        features: Sequence[Tensor] = (),
        branches: Sequence[Tensor] = (),
        loss_scale: float = 1.0,
    ) -> CalibrationStats:
        """Fill `.grad` of every parameter from the per-task `losses` of one forward pass.

        features: that forward's shared representation (levels "features" and "fuller");
        branches: its branch points (level "fuller").  The "params" level needs neither."""
        names = task_order(losses)
        scaled = {t: losses[t] * loss_scale for t in names} if loss_scale != 1.0 else dict(losses)
        heads = {t: [p for p in self.model.task_parameters(t) if p.requires_grad] for t in names}
        self.synced_parameters = []
        reused = self._reusable(len(names))
        if reused is not None:
            return self._reuse(names, scaled, heads, loss_scale, reused, list(features))
        if self.level == "params":
            values = torch.stack([losses[t].detach().reshape(()).double() for t in names])
            return self._params(names, scaled, heads, loss_scale, values)
        return self._features(names, scaled, heads, loss_scale, list(features), list(branches))

    def state_dict(self) -> dict:
        return self.aggregator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state)

    # ------------------------------------------------------------------------------------ levels
    def _features(self, names, losses, heads, loss_scale: float, features, branches) -> CalibrationStats:
        reps = [r for r in features if r.requires_grad]
        if not reps:
            raise CalibrationError(
                "the model exposes no shared representation that requires grad (cross-stitch, TaskPrompter and "
                "TAPS have none, nor has a frozen backbone): use level='params'"
            )
        # shared parameters downstream of the representation (cross-task attention, distillation):
        # they get Σ_t w_t ∂L_t/∂θ with the weights calibrated at the representation
        below = upstream_parameters(reps)
        after = [p for p in self.model.shared_parameters() if p.requires_grad and id(p) not in below]
        per_task, per_task_after = [], []
        n = len(reps)
        for t in names:
            grads = torch.autograd.grad(losses[t], reps + after + heads[t], retain_graph=True, allow_unused=True)
            rep_grads = grads[:n]
            if all(g is None for g in rep_grads):
                raise CalibrationError(f"task {t!r} has no gradient path to the shared representation")
            per_task.append([torch.zeros_like(r) if g is None else g for r, g in zip(reps, rep_grads)])
            per_task_after.append(grads[n : n + len(after)])
            accumulate_grads(heads[t], grads[n + len(after) :])
        world = dist.world_size()
        k = gramian(per_task) / loss_scale**2
        if world > 1:
            dist.all_reduce_sum_(k)
            k /= world**2
        finite = bool(torch.isfinite(k).all())
        if isinstance(self.aggregator, GradDrop):
            combined = self._graddrop_features(per_task, reps, finite)
            weights = torch.ones(len(names), dtype=torch.float64)
        else:
            weights = self._weights(k, finite)
            combined = [sum(float(w) * gs[i] for w, gs in zip(weights, per_task)) for i in range(len(reps))]
        for i, p in enumerate(after):
            parts = [float(w) * gs[i] for w, gs in zip(weights, per_task_after) if gs[i] is not None]
            if parts:
                accumulate_grads([p], [sum(parts)])
        if self.level == "fuller":
            self._fuller(reps, combined, branches, world)
        else:
            torch.autograd.backward(reps, grad_tensors=combined)  # through the shared part only
        return calibration_stats(names, weights, k, finite)

    def _params(self, names, losses, heads, loss_scale: float, values: Tensor) -> CalibrationStats:
        shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        if not shared:
            raise CalibrationError("the model has no shared parameters to calibrate")
        numel = sum(p.numel() for p in shared)
        flat = torch.empty(len(names), numel, dtype=shared[0].dtype, device=shared[0].device)  # T x P, scaled
        for i, t in enumerate(names):
            grads = torch.autograd.grad(
                losses[t], shared + heads[t], retain_graph=i < len(names) - 1, allow_unused=True
            )
            if all(g is None for g in grads[: len(shared)]):
                raise CalibrationError(f"task {t!r} has no gradient path to the shared parameters")
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(shared, grads)], out=flat[i])
            accumulate_grads(heads[t], grads[len(shared) :])
        if dist.world_size() > 1:
            dist.all_reduce_mean_(flat)
        k = gramian([[row] for row in flat]) / loss_scale**2
        finite = bool(torch.isfinite(k).all())
        if isinstance(self.aggregator, GradDrop):
            weights = torch.ones(len(names), dtype=torch.float64)
            combined_flat = graddrop(flat, leak=self.aggregator.leak, generator=self.aggregator.generator) if finite else flat.sum(0)
        elif isinstance(self.aggregator, GradientTracker):
            if dist.world_size() > 1:  # the loss values of the whole batch, like the averaged gradients
                values = dist.all_reduce_mean_(values.to(flat.device)).cpu()
            finite = finite and bool(torch.isfinite(values).all())
            weights = torch.ones(len(names), dtype=torch.float64)
            combined_flat = flat.sum(0)
            if finite:  # non-finite: the step is skipped and the tracked state stays where it is
                direction, weights = self.aggregator.combine(flat / loss_scale if loss_scale != 1.0 else flat, values)
                combined_flat = direction * loss_scale if loss_scale != 1.0 else direction
        else:
            weights = self._weights(k, finite)
            combined_flat = weights.to(flat) @ flat
        for p, part in zip(shared, split_flat(combined_flat, shared)):  # slices become the gradients: no copy
            p.grad = part if p.grad is None else p.grad + part
        self.synced_parameters = shared
        return calibration_stats(names, weights, k, finite)

    def _reusable(self, num_tasks: int) -> Tensor | None:
        """The aggregator's reused weights for this call (None: per-task gradients are needed)."""
        if self.level == "fuller" or not isinstance(self.aggregator, Aggregator) or num_tasks < 2:
            return None
        w = self.aggregator.reuse(num_tasks)
        if w is None or not (abs(w) > 0).any():  # all weights 0: the per-task path handles it
            return None
        return torch.as_tensor(w, dtype=torch.float64)

    def _reuse(self, names, losses, heads, loss_scale: float, weights: Tensor, features) -> CalibrationStats:
        """One backward pass of Σ_t w_t L_t with the aggregator's reused weights: the same gradients
        as the per-task path with these weights (heads keep their own plain gradients)."""
        owned = [id(p) for t in names for p in heads[t]]
        if len(set(owned)) != len(owned):
            raise CalibrationError("task parameters shared between tasks: weights cannot be reused in one backward pass")
        top = float(weights.abs().max())
        small = [t for t, w in zip(names, weights.tolist()) if abs(w) <= 1e-6 * top]
        for t in small:  # a head whose weight is (nearly) 0: its own gradient, through the head only
            if heads[t]:
                accumulate_grads(heads[t], torch.autograd.grad(losses[t], heads[t], retain_graph=True, allow_unused=True))
        total = sum(float(w) * losses[t] for t, w in zip(names, weights.tolist()) if t not in small)
        big = [t for t in names if t not in small]
        head_params = [p for t in big for p in heads[t]]
        if self.level == "params":
            shared = [p for p in self.model.shared_parameters() if p.requires_grad]
            grads = torch.autograd.grad(total, shared + head_params, allow_unused=True)
            flat = flatten(shared, grads[: len(shared)])
            if dist.world_size() > 1:
                dist.all_reduce_mean_(flat)
            norm = float(flat.double().norm()) / loss_scale
            down, between = [], []
        else:
            reps = [r for r in features if r.requires_grad]
            if not reps:
                raise CalibrationError("the model exposes no shared representation that requires grad: use level='params'")
            below = upstream_parameters(reps)
            between = [p for p in self.model.shared_parameters() if p.requires_grad and id(p) not in below]
            grads = torch.autograd.grad(total, reps + between + head_params, retain_graph=True, allow_unused=True)
            down = [torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads[: len(reps)])]
            sq = sum(g.double().pow(2).sum() for g in down)
            if dist.world_size() > 1:
                dist.all_reduce_sum_(sq)
                sq = sq / dist.world_size() ** 2
            norm = float(sq.sqrt()) / loss_scale
            shared = reps
        finite = math.isfinite(norm)
        factor = self.aggregator.reused(norm) if finite else 1.0
        rest = grads[len(shared) :]
        for p, g in zip(between, rest[: len(between)]):
            if g is not None:
                accumulate_grads([p], [g * factor])
        offset = len(between)
        for t, w in zip(names, weights.tolist()):
            if t in small:
                continue
            part = rest[offset : offset + len(heads[t])]
            offset += len(heads[t])
            accumulate_grads(heads[t], [None if g is None else g / w for g in part])
        if self.level == "params":
            for p, part in zip(shared, split_flat(flat * factor, shared)):
                p.grad = part if p.grad is None else p.grad + part
            self.synced_parameters = shared
        else:
            torch.autograd.backward(reps, grad_tensors=[g * factor for g in down])
        nan = torch.full((len(names), len(names)), float("nan"), dtype=torch.float64)
        return calibration_stats(names, weights * factor, nan, finite)

    # ------------------------------------------------------------------------------------ pieces
    def _weights(self, gramian: Tensor, finite: bool) -> Tensor:
        if not finite:  # the step will be skipped: keep the aggregator's state where it is
            return torch.ones(len(gramian), dtype=torch.float64)
        return self.aggregator(gramian.cpu()).double()

    def _graddrop_features(self, per_task: list[list[Tensor]], reps: list[Tensor], finite: bool) -> list[Tensor]:
        """GradDrop on each representation tensor, masks shared over the (global) batch."""
        if not finite:
            return [sum(gs[i] for gs in per_task) for i in range(len(reps))]
        out = []
        for i, rep in enumerate(reps):
            grads = torch.stack([gs[i] for gs in per_task])  # T x B x ...
            if rep.ndim < 1 or grads.shape[1] == 0:
                raise CalibrationError("GradDrop at the features level needs batched representation tensors")
            reduce = dist.all_reduce_sum_ if dist.world_size() > 1 else None
            drop = self.aggregator
            out.append(graddrop(grads, rep.detach(), drop.leak, drop.generator, batch=True, reduce=reduce))
        return out

    def _fuller(self, reps: list[Tensor], combined: list[Tensor], branches: Sequence[Tensor], world: int) -> None:
        """Carry the calibrated gradient to the branch tensors, equalise their norms, go on down."""
        branches = [b for b in branches if b.requires_grad]
        if not branches:
            raise CalibrationError("level 'fuller' needs branch points (the model output's `branches` is empty)")
        below = upstream_parameters(branches)
        between = [p for p in self.model.shared_parameters() if p.requires_grad and id(p) not in below]
        grads = torch.autograd.grad(reps, branches + between, grad_outputs=combined, retain_graph=True, allow_unused=True)
        branch_grads = [torch.zeros_like(b) if g is None else g for b, g in zip(branches, grads[: len(branches)])]
        accumulate_grads(between, grads[len(branches) :])
        sq = torch.stack([g.double().pow(2).sum() for g in branch_grads])
        if world > 1:
            dist.all_reduce_sum_(sq)
        norms = sq.sqrt()
        active = norms > 0
        if bool(torch.isfinite(norms).all()) and bool(active.any()):
            target = norms[active].mean()
            factors = torch.where(active, target / norms.clamp_min(1e-300), torch.ones_like(norms))
            branch_grads = [g * float(f) for g, f in zip(branch_grads, factors)]
        torch.autograd.backward(branches, grad_tensors=branch_grads)


def make_calibration_method(
    method: str, level: str = "features", sam_rho: float | None = None, **options
) -> Aggregator | GradDrop:
    """The aggregator `method` (a key of AGGREGATORS) or GradDrop, with its options checked, and the
    level / sharpness-aware combination checked too (no model needed: configs are checked early)."""
    if level not in LEVELS:
        raise CalibrationError(f"unknown calibration level {level!r} (valid: {', '.join(LEVELS)})")
    if sam_rho is not None and level != "params":
        raise CalibrationError(f"the sharpness-aware step works at the params level, got level {level!r}")
    if method == "graddrop":
        if sam_rho is not None:
            raise CalibrationError("the sharpness-aware step needs a Gramian aggregator, not graddrop")
        cls = GradDrop
    elif method in AGGREGATORS:
        cls = AGGREGATORS[method]
    elif method in TRACKED:
        if sam_rho is not None:
            raise CalibrationError(f"the sharpness-aware step needs a Gramian aggregator, not {method!r}")
        cls = TRACKED[method]
    else:
        raise unknown_name("calibration method", method, METHODS)
    valid = list(inspect.signature(cls).parameters)
    for key in options:
        if key not in valid:
            raise unknown_name(f"option of calibration method {method!r}", key, valid)
    if cls is GradDrop:
        return GradDrop(**options)
    built = make_tracker(method, **options) if method in TRACKED else make_aggregator(method, **options)
    check_level(built, level)
    return built
