"""Per-task losses, and the one place where they become a gradient.

Every training step computes a `dict[task, loss]` and hands it to `objective.backward(losses, step)`.
`MultiTaskObjective` composes, in this order:

1. `loss_weights`: fixed per-task multipliers (e.g. the InvPT recipe's edge × 50), applied first;
2. a loss weighting (`mtvision.optim.weighting`: EW by default, UW, DWA, GradNorm, FAMO, ...), which
   turns the losses into a total whose model gradient is Σ_t w_t ∇L_t, plus its own parameters'
   gradients;
3. optionally a gradient calibrator (`mtvision.optim.calibrator`), which receives the weighted
   per-task losses w_t·L_t and combines their gradients through an aggregator.

Without a calibrator, `backward` is a single backward pass of the total, so EW with no calibration
is exactly the plain (weighted) summed loss.  With a calibrator the DDP model must run its forward
under `no_sync()` (`manual_sync` is True) and the trainer averages the gradients afterwards with
`sync_gradients`; the weighting's own parameters are outside DDP and are always averaged there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtvision.engine import distributed as dist
from mtvision.optim.calibrator import CalibrationStats, GradientCalibrator, accumulate_grads, split_flat
from mtvision.optim.sam import SharpnessAwareCalibrator
from mtvision.optim.weighting import LossWeighting, make_weighting
from mtvision.tasks import Task


def compute_losses(
    outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], tasks: Mapping[str, Task], aux_weight: float = 1.0
) -> dict[str, Tensor]:
    """Each task's loss on its output; deep-supervision outputs (`outputs['aux'][task]`, a tensor or a
    list of tensors) add `aux_weight` x their loss to the same task's entry."""
    losses: dict[str, Tensor] = {}
    aux = outputs.get("aux", {}) or {}
    for name, task in tasks.items():
        if name not in outputs:
            continue
        target = batch[name]
        loss = task.loss(outputs[name].float(), target)
        extra = aux.get(name, [])
        for pred in extra if isinstance(extra, (list, tuple)) else [extra]:
            if pred.shape[-2:] != target.shape[-2:]:
                pred = torch.nn.functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + aux_weight * task.loss(pred.float(), target)
        losses[name] = loss
    return losses


class MultiTaskObjective:
    """Fixed loss weights -> loss weighting -> (optional) gradient calibration -> `.grad`.

    `shared` returns what GradNorm measures gradient norms on (the last shared tensors); it is
    called only for weightings that need it.
    """

    def __init__(
        self,
        weighting: LossWeighting,
        calibrator: GradientCalibrator | SharpnessAwareCalibrator | None = None,
        loss_weights: Mapping[str, float] | None = None,
        shared: Callable[[], Sequence[Tensor]] | None = None,
    ) -> None:
        self.weighting, self.calibrator = weighting, calibrator
        self.loss_weights = dict(loss_weights or {})
        unknown = [t for t in self.loss_weights if t not in weighting.tasks]
        if unknown:
            raise ValueError(f"loss_weights name tasks {unknown} that are not in {weighting.tasks}")
        self.shared = shared
        self.last_weights: dict[str, float] = {t: self.loss_weights.get(t, 1.0) for t in weighting.tasks}
        self.last_stats: CalibrationStats | None = None
        self._log_sums: dict[str, float] = {}
        self._log_counts: dict[str, int] = {}
        self._regularizer_grads: dict[str, tuple[list[nn.Parameter], Tensor]] = {}

    # -------------------------------------------------------------------------------- properties
    @property
    def manual_sync(self) -> bool:
        """Whether gradients must be averaged across ranks by `sync_gradients` (DDP forward in no_sync)."""
        return self.calibrator is not None

    @property
    def needs_recompute(self) -> bool:
        """Whether `backward` needs `recompute` (the sharpness-aware step's perturbed forwards)."""
        return getattr(self.calibrator, "needs_recompute", False)

    @property
    def needs_losses_after_step(self) -> bool:
        """Whether `after_step` wants the same batch's losses from the updated model (FAMO)."""
        return self.weighting.needs_losses_after_step

    def extra_parameters(self) -> list[nn.Parameter]:
        """The weighting's trainable parameters, for the optimizer (no weight decay)."""
        return self.weighting.extra_parameters()

    # -------------------------------------------------------------------------------- the step
    def prescale(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The losses times their fixed `loss_weights`."""
        return {t: (self.loss_weights[t] * v if t in self.loss_weights else v) for t, v in losses.items()}

    def backward(
        self,
        losses: Mapping[str, Tensor],
        step: int = 0,
        scale: float = 1.0,
        scaler: torch.amp.GradScaler | None = None,
        recompute: Callable[[str], Tensor] | None = None,
        regularizer: Tensor | None = None,
    ) -> Tensor:
        """Accumulate the gradient of `scale` x the objective into `.grad`; returns the (detached) scaled total.

        recompute(task): that task's raw loss from a fresh forward of the same batch (needed only by
        the sharpness-aware step, `needs_recompute`).
        regularizer: a model-level loss that is not a task (the MoE load-balancing loss): added to the
        total as it is, outside the fixed weights, the loss weighting and the calibrator's Gramian."""
        prescaled = self._agree_finite(self.prescale(losses))
        shared = list(self.shared()) if (self.weighting.needs_shared_grads and self.shared is not None) else None
        total, weights = self.weighting(prescaled, step, shared=shared)
        # GradScaler's scale (scaling a one also creates the scale on first use, as scale(loss) would)
        loss_scale = float(scaler.scale(total.detach().new_ones(()))) if scaler is not None and scaler.is_enabled() else 1.0
        if self.calibrator is None:
            scaled = (total if regularizer is None else total + regularizer) * scale
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            self._record(weights, None)
            return scaled.detach()
        tasks = self.weighting.tasks
        # the calibrator needs each loss's coefficient in the model gradient, ∂total/∂L_t: the reported
        # weight for most methods, w_t / L_t for IGB's log-losses
        coefficients = torch.autograd.grad(total, [prescaled[t] for t in tasks], retain_graph=True, allow_unused=True)
        coef = {t: 0.0 if g is None else float(g) for t, g in zip(tasks, coefficients)}
        if regularizer is not None and regularizer.requires_grad:
            self._regularizer_backward(regularizer * (scale * loss_scale))
        extra = [p for p in self.weighting.extra_parameters() if p.requires_grad]
        if extra and total.requires_grad:  # the weighting's own parameters: from its total, as without calibration
            torch.autograd.backward(total * (scale * loss_scale), inputs=extra, retain_graph=True)
        per_task = {t: prescaled[t] * (coef[t] * scale) for t in tasks}
        if self.needs_recompute:
            if recompute is None:
                raise ValueError("this calibration (sharpness-aware step) needs backward(..., recompute=...)")
            factors = {t: self.loss_weights.get(t, 1.0) * coef[t] * scale for t in tasks}
            stats = self.calibrator.backward(per_task, loss_scale=loss_scale, recompute=lambda t: recompute(t) * factors[t])
        else:
            stats = self.calibrator.backward(per_task, loss_scale=loss_scale)
        self._record(weights, stats)
        scaled = ((total if regularizer is None else total + regularizer) * scale).detach()
        if not stats.finite and loss_scale == 1.0:
            # non-finite gradients: make the trainer skip the step (with a GradScaler, the inf/NaN
            # gradients make the scaler skip it and lower its scale, as for uncalibrated steps)
            scaled = scaled * float("nan")
        return scaled

    def _agree_finite(self, prescaled: dict[str, Tensor]) -> dict[str, Tensor]:
        """Under DDP, one rank's non-finite loss makes every rank's losses non-finite, so that every
        weighting skips its state update (RLW's draw, DWA's sums) on every rank alike."""
        if dist.world_size() < 2:
            return prescaled
        device = next(iter(prescaled.values())).device
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(v.detach()).all()) for v in prescaled.values()) else 1.0], device=device)
        dist.all_reduce_sum_(bad)
        return {t: v * float("nan") for t, v in prescaled.items()} if float(bad) > 0 else prescaled

    def _regularizer_backward(self, regularizer: Tensor) -> None:
        """The regularizer's plain gradient: into `.grad` at once in one process; under DDP kept
        apart and averaged in `sync_gradients` (the calibrator's synced parameters skip averaging)."""
        params = [p for p in self.calibrator.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(regularizer, params, retain_graph=True, allow_unused=True)
        if dist.world_size() < 2:
            accumulate_grads(params, grads)
            return
        # every rank holds every parameter (zeros where unused), so the all-reduce lines up
        flat = torch.cat([(torch.zeros_like(p) if g is None else g.detach()).reshape(-1) for p, g in zip(params, grads)])
        held = self._regularizer_grads.get("flat")
        self._regularizer_grads["flat"] = (params, flat if held is None else held[1] + flat)

    def zero_grad(self) -> None:
        """Forget regularizer gradients held for averaging (call with `optimizer.zero_grad()`)."""
        self._regularizer_grads.clear()

    def sync_gradients(self, model: nn.Module) -> None:
        """Average across ranks the gradients that are not averaged yet (call after the last micro-batch)."""
        if dist.world_size() < 2:
            return
        done = {id(p) for p in self.calibrator.synced_parameters} if self.calibrator is not None else set()
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in done] if self.manual_sync else []
        params += [p for p in self.weighting.extra_parameters() if p.requires_grad]
        average_gradients(params)
        if self._regularizer_grads:
            held_params, flat = self._regularizer_grads.pop("flat")
            dist.all_reduce_mean_(flat)
            accumulate_grads(held_params, split_flat(flat, held_params))

    def after_step(self, losses_after: Mapping[str, Tensor] | None) -> None:
        """After the optimizer step (None: it was skipped); `losses_after` are raw, un-prescaled losses."""
        if losses_after is not None:
            losses_after = self.prescale(losses_after)
            if dist.world_size() > 1:
                losses_after = {t: dist.all_reduce_mean_(v.detach().float().clone()) for t, v in losses_after.items()}
        self._sync_buffers()
        self.weighting.after_step(losses_after)

    def end_epoch(self) -> None:
        """At the end of a training epoch (DWA, IGB)."""
        self._sync_buffers()
        self.weighting.end_epoch()

    def _sync_buffers(self) -> None:
        """Average the weighting's floating-point running state over ranks, so every rank agrees."""
        if dist.world_size() < 2:
            return
        for buffer in self.weighting.buffers():
            if buffer.is_floating_point():
                dist.all_reduce_mean_(buffer)

    # -------------------------------------------------------------------------------- logging, state
    def _record(self, weights: Mapping[str, float], stats: CalibrationStats | None) -> None:
        self.last_weights = dict(weights)
        self.last_stats = stats
        values = {f"loss_weight/{t}": float(w) for t, w in weights.items()}
        if stats is not None and stats.finite:
            values.update({f"calibration/{k}": v for k, v in stats.scalars().items()})
        for k, v in values.items():
            if math.isfinite(v):  # a singular Gramian's condition number is inf: left out of the mean
                self._log_sums[k] = self._log_sums.get(k, 0.0) + v
                self._log_counts[k] = self._log_counts.get(k, 0) + 1

    def progress_postfix(self) -> dict[str, str | float]:
        """Short console values: the task weights ("w 1.00/0.52/...", in task order) and the most
        conflicting pair's gradient cosine; nothing for plain equal weighting."""
        if self.calibrator is None and self.weighting.name == "ew":
            return {}
        stats = self.last_stats if self.last_stats is not None and self.last_stats.finite else None
        weights = stats.weights if stats is not None else self.last_weights
        out: dict[str, str | float] = {"w": "/".join(f"{weights[t]:.2f}" for t in self.weighting.tasks)}
        if stats is not None and len(weights) > 1:
            c = stats.cosines.clone()
            c.fill_diagonal_(float("inf"))
            out["cos_min"] = float(c.min())
        return out

    def consume_log(self) -> dict[str, float]:
        """Averages of the task weights and conflict statistics since the last call (for loggers)."""
        out = {k: v / self._log_counts[k] for k, v in self._log_sums.items()}
        self._log_sums, self._log_counts = {}, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "weighting": self.weighting.state_dict(),
            "calibrator": self.calibrator.state_dict() if self.calibrator is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weighting.load_state_dict(state["weighting"])
        if self.calibrator is not None and state.get("calibrator") is not None:
            self.calibrator.load_state_dict(state["calibrator"])


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average `.grad` of `params` across ranks in one flat all-reduce (a missing gradient counts as
    zero where any rank has one; parameters without a gradient on every rank keep None)."""
    if dist.world_size() < 2 or not params:
        return
    device = params[0].device
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce_sum_(present)
    chosen = [p for p, n in zip(params, present.tolist()) if n > 0]
    if not chosen:
        return
    for p in chosen:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in chosen])
    dist.all_reduce_mean_(flat)
    for p, part in zip(chosen, split_flat(flat, chosen)):
        p.grad.copy_(part)


def check_objective(
    tasks: Sequence[str],
    weighting: str = "ew",
    weighting_options: Mapping[str, Any] | None = None,
    calibration: str | None = None,
    level: str = "features",
    calibration_options: Mapping[str, Any] | None = None,
    sam_rho: float | None = None,
) -> None:
    """Raise the error `build_objective` would raise for these methods and options, without a model
    (the trainer calls it before the run folder is touched)."""
    from mtvision.optim.calibrator import make_calibration_method

    make_weighting(weighting, list(tasks), **dict(weighting_options or {}))
    if calibration:
        make_calibration_method(calibration, level, sam_rho, **dict(calibration_options or {}))


def build_objective(
    model: nn.Module,
    tasks: Sequence[str],
    weighting: str = "ew",
    weighting_options: Mapping[str, Any] | None = None,
    calibration: str | None = None,
    level: str = "features",
    calibration_options: Mapping[str, Any] | None = None,
    loss_weights: Mapping[str, float] | None = None,
    sam_rho: float | None = None,
) -> MultiTaskObjective:
    """The objective a config describes, for the (unwrapped) multi-task `model`."""
    from mtvision.optim.calibrator import make_calibrator

    method = make_weighting(weighting, list(tasks), **dict(weighting_options or {}))
    calibrator = (
        make_calibrator(model, calibration, level, sam_rho=sam_rho, **dict(calibration_options or {})) if calibration else None
    )

    def shared() -> list[Tensor]:
        reps = [r for r in model.shared_representation() if r.requires_grad]
        return reps or [p for p in model.shared_parameters() if p.requires_grad][-1:]

    return MultiTaskObjective(method, calibrator, loss_weights, shared)
