"""The training objective: per-task losses, and the one place where they become an optimizer step.

`objective.step(model, batches, step)` runs one optimizer step over the micro-batches of that step
and returns a `StepRecord` (losses, regularizers and model statistics as device tensors, whether the
step was taken, whether a stop was requested on any rank).  Each micro-batch's losses go through
`backward`, which composes, in this order:

1. `loss_weights`: fixed per-task multipliers (e.g. the InvPT recipe's edge × 50), applied first;
2. a loss weighting (`mtvision.optim.weighting`: EW by default, UW, DWA, GradNorm, FAMO, ...), which
   turns the losses into a total whose model gradient is Σ_t w_t ∇L_t, plus its own parameters'
   gradients;
3. optionally a gradient calibrator (`mtvision.optim.calibrator`), which receives the weighted
   per-task losses w_t·L_t and combines their gradients through an aggregator at the model
   output's shared representation (`features`), branch points (`fuller`) or parameters (`params`).

The model's regularizers (MoE balance, TAPS sparsity) are added to the total as they are, outside
all three.  Without a calibrator, `backward` is a single backward pass of the total, so EW with no
calibration is exactly the plain summed loss.

Each method's special case lives with the method and is called from `step`:
- FAMO (`needs_losses_after_step`): after the optimizer step, a no-grad forward of the updated
  model on the step's micro-batches gives `after_step` the losses it compares;
- the sharpness-aware step (`needs_recompute`): fresh single-task forwards of the micro-batch;
- DWA and IGB: `end_epoch` when a micro-batch of a new epoch arrives (at a step boundary: one step,
  one set of weights), with the epoch kept in `state_dict`;
- GradNorm: the model output's shared representation (or the last shared parameter).

Losses are pixel means over the whole step: each task's summed loss is divided by the valid-pixel
count of all the step's micro-batches on all ranks (`step_counts`, one small all-reduce before the
forwards under DDP), so 2 ranks x batch B/2, or 2 accumulated micro-batches, give the loss of one
batch of B even when random scaling and padding leave different samples with different numbers of
valid pixels.  After the backward passes the ranks agree on everything else in one small all-reduce: whether any rank saw a non-finite
loss (then every rank skips the step and puts the weighting's state back as it was before the step,
so that RLW's draws, DWA's sums and FAMO's pending losses stay equal on every rank), whether any rank
was asked to stop, and which parameters hold gradients.  With a calibrator, the model runs under
`no_sync()` and the gradients the calibrator has not averaged are averaged in one flat all-reduce.
Nothing is read back from the device per micro-batch: the trainer turns the record's tensors into
floats at log time.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtvision import distributed as dist
from mtvision.data.camera import batch_intrinsics
from mtvision.engine.evaluator import autocast_context
from mtvision.models.decoders.base import ModelOutput
from mtvision.models.regularizer3d.model import missing_intrinsics
from mtvision.optim.calibrator import make_calibration_method
from mtvision.optim.factory import Calibrator, make_calibrator
from mtvision.optim.gradients import (
    CalibrationStats,
    accumulate_grads,
    average_gradients,
    flatten,
    gradient_presence,
    split_flat,
)
from mtvision.optim.sam import SharpnessAwareCalibrator
from mtvision.optim.weighting import LossWeighting, make_weighting
from mtvision.tasks import Task, with_loss


def compute_losses(
    predictions: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    tasks: Mapping[str, Task],
    deep_supervision: Mapping[str, Sequence[Tensor]] | None = None,
    aux_weight: float = 1.0,
    counts: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Each task's loss on its prediction; each deep-supervision prediction of a task (resized to the
    target) adds `aux_weight` x its loss to the same task's entry.  `counts[task]`: divide the summed
    loss by this instead of the batch's own valid-pixel count (see `step_counts`)."""
    losses: dict[str, Tensor] = {}
    count_of = counts or {}
    for name, task in tasks.items():
        if name not in predictions:
            continue
        target, count = targets[name], count_of.get(name)
        loss = task.loss(predictions[name].float(), target, count)
        for pred in (deep_supervision or {}).get(name, []):
            if pred.shape[-2:] != target.shape[-2:]:
                pred = torch.nn.functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + aux_weight * task.loss(pred.float(), target, count)
        losses[name] = loss
    return losses


def step_counts(tasks: Mapping[str, Task], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per task, the valid-pixel count of a whole step (all micro-batches, all ranks: one all-reduce
    under DDP) divided by (micro-batches x ranks): the divisor that makes each micro-batch's loss the
    step's pixel mean scaled to one micro-batch, so that accumulating micro-batches, or averaging
    DDP ranks, gives the loss of one batch of all the step's samples whatever their valid pixels."""
    names = list(tasks)
    total = torch.stack([sum(tasks[t].valid_count(batch[t]) for batch in targets) for t in names]).double()
    world = dist.world_size()
    if world > 1:
        dist.all_reduce_sum_(total)
    total = total / (len(targets) * world)
    return dict(zip(names, total.unbind()))


@dataclass
class StepRecord:
    """One optimizer step: raw per-task losses, regularizers and model statistics (means over the
    micro-batches, detached device tensors), whether the optimizer stepped, whether any rank asked
    to stop, and the images this rank processed."""

    losses: dict[str, Tensor]
    regularizers: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    stepped: bool = True
    nonfinite: bool = False
    stop: bool = False
    images: int = 0


class MultiTaskObjective:
    """Fixed loss weights -> loss weighting -> (optional) gradient calibration -> `.grad` -> step.

    `backward` handles one micro-batch's losses; `step` runs a whole optimizer step and needs the
    keyword arguments: `core` (the unwrapped model, whose parameters are updated), `tasks`, the
    `optimizer`, and optionally a fp16 `scaler`, `grad_clip`, `amp` ("none", "bf16", "fp16"),
    `device` and `channels_last`.
    """

    def __init__(
        self,
        weighting: LossWeighting,
        calibrator: Calibrator | None = None,
        loss_weights: Mapping[str, float] | None = None,
        *,
        core: nn.Module | None = None,
        tasks: Mapping[str, Task] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        grad_clip: float | None = None,
        amp: str = "none",
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        self.weighting, self.calibrator = weighting, calibrator
        self.loss_weights = dict(loss_weights or {})
        unknown = [t for t in self.loss_weights if t not in weighting.tasks]
        if unknown:
            raise ValueError(f"loss_weights name tasks {unknown} that are not in {weighting.tasks}")
        self.core = core if core is not None else (calibrator.model if calibrator is not None else None)
        self.tasks = dict(tasks or {})
        self.optimizer, self.scaler, self.grad_clip = optimizer, scaler, grad_clip
        self.amp, self.device, self.channels_last = amp, torch.device(device), channels_last
        self.epoch = 0
        self.last_weights: dict[str, float] = {t: self.loss_weights.get(t, 1.0) for t in weighting.tasks}
        self.last_stats: CalibrationStats | None = None
        self._log_sums: dict[str, float] = {}
        self._log_counts: dict[str, int] = {}
        self._held: list[tuple[list[nn.Parameter], Tensor]] = []  # regularizer gradients of synced parameters

    # -------------------------------------------------------------------------------- properties
    @property
    def manual_sync(self) -> bool:
        """Whether the DDP forward must run in no_sync and `sync_gradients` average the gradients."""
        return self.calibrator is not None

    @property
    def needs_recompute(self) -> bool:
        """Whether `backward` needs `recompute` (the sharpness-aware step's perturbed forwards)."""
        return isinstance(self.calibrator, SharpnessAwareCalibrator)

    def extra_parameters(self) -> list[nn.Parameter]:
        """The weighting's trainable parameters, for the optimizer (no weight decay)."""
        return self.weighting.extra_parameters()

    # -------------------------------------------------------------------------------- one step
    def step(self, model: nn.Module, batches: Sequence[Mapping[str, Any]], step: int, *,
             epochs: Sequence[int] | None = None, stop: bool = False) -> StepRecord:
        """One optimizer step on `batches` (the micro-batches) through `model` (the module to run:
        the core, or its DDP / compiled wrapper); `epochs[i]` is the epoch of micro-batch i."""
        if self.optimizer is None or self.core is None or not self.tasks:
            raise ValueError("MultiTaskObjective.step needs core=, tasks= and optimizer= at construction")
        epochs = list(epochs) if epochs is not None else [self.epoch] * len(batches)
        if epochs[0] != self.epoch:  # an epoch ended before this step (DWA and IGB update their weights)
            self.end_epoch()
            self.epoch = epochs[0]
        before = copy.deepcopy(self.weighting.state_dict())
        self.optimizer.zero_grad(set_to_none=True)
        self._held.clear()
        ddp = isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "no_sync")
        sums: dict[str, dict[str, Tensor]] = {"losses": {}, "regularizers": {}, "stats": {}}
        total_sum, kept, images = None, [], 0
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        inputs = [self._inputs(batch) for batch in batches]
        counts = step_counts(self.tasks, [targets for _, targets, _ in inputs])
        for i, (x, targets, camera) in enumerate(inputs):
            last = i == len(batches) - 1
            sync = not ddp or (not self.manual_sync and last)
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast_context(self.device, self.amp):
                output = model(x, **camera)
            losses = compute_losses(output.predictions, targets, self.tasks, output.deep_supervision, counts=counts)
            recompute = self._recompute(x, targets, counts, camera) if self.needs_recompute else None
            total = self.backward(losses, output, step, scale=1.0 / len(batches), scaler=scaler, recompute=recompute)
            total_sum = total if total_sum is None else total_sum + total
            for kind, values in (("losses", losses), ("regularizers", output.regularizers), ("stats", output.stats)):
                for k, v in values.items():
                    v = v.detach().float() / len(batches)
                    sums[kind][k] = v if k not in sums[kind] else sums[kind][k] + v
            if self.weighting.needs_losses_after_step:
                kept.append((x, targets, camera))
            images += x.shape[0]
        nonfinite, stop, present = self._agree(total_sum, stop)
        stepped = not nonfinite
        if stepped:
            self.sync_gradients(self.core, present)
            stepped = self._optimizer_step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.weighting.load_state_dict(before)  # as if the step had not been seen, on every rank
        self.after_step(self._losses_after(kept) if stepped and kept else None)
        if epochs[-1] != self.epoch:  # the epoch ended inside this step: its weights waited for the step's end
            self.end_epoch()
            self.epoch = epochs[-1]
        return StepRecord(sums["losses"], sums["regularizers"], sums["stats"], stepped, nonfinite, stop, images)

    def _inputs(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """(images, targets, camera): camera holds the keyword `intrinsics` (N x 3 x 3, from the
        samples' meta) for a model that needs them (`needs_intrinsics`: the 3D-aware regulariser)."""
        x = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        camera: dict[str, Tensor] = {}
        if getattr(self.core, "needs_intrinsics", False):
            intrinsics = batch_intrinsics(batch.get("meta"))
            if intrinsics is None:
                raise missing_intrinsics("training batch")
            camera["intrinsics"] = intrinsics.to(self.device, non_blocking=True)
        return x, {t: batch[t].to(self.device, non_blocking=True) for t in self.tasks}, camera

    def _recompute(self, images: Tensor, targets: Mapping[str, Tensor], counts: Mapping[str, Tensor],
                   camera: Mapping[str, Tensor]) -> Callable[[str], Tensor]:
        """recompute(task): `task`'s loss from a fresh forward of this micro-batch that runs only its path."""

        def recompute(task: str) -> Tensor:
            with autocast_context(self.device, self.amp):
                out = self.core(images, tasks=[task], **camera)
            return compute_losses(out.predictions, targets, {task: self.tasks[task]}, out.deep_supervision, counts=counts)[task]

        return recompute

    def _agree(self, total: Tensor, stop: bool) -> tuple[bool, bool, list[float] | None]:
        """(any rank non-finite, any rank asked to stop, gradient presence summed over ranks): one
        all-reduce under DDP, one read from the device in one process."""
        flags = torch.stack([(~torch.isfinite(total.detach())).float(), total.new_tensor(float(stop))])
        unsynced = self._unsynced_parameters(self.core)
        if dist.world_size() < 2:
            values = flags.tolist()
            return values[0] > 0, values[1] > 0, None
        control = torch.cat([flags, gradient_presence(unsynced).to(flags)])
        dist.all_reduce_sum_(control)
        values = control.tolist()
        return values[0] > 0, values[1] > 0, values[2:]

    def _optimizer_step(self) -> bool:
        """Unscale, clip and step; False when GradScaler skipped the step (inf/NaN under fp16)."""
        params = [p for p in self.core.parameters() if p.requires_grad]
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if scaler is None:
            self.optimizer.step()
            return True
        scale_before = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        return scaler.get_scale() >= scale_before  # a lowered scale: GradScaler skipped the step

    @torch.no_grad()
    def _losses_after(self, kept: Sequence[tuple[Tensor, Mapping[str, Tensor], Mapping[str, Tensor]]]) -> dict[str, Tensor]:
        """The step's per-task losses from the updated model (train mode, as FAMO's code does),
        averaged over its micro-batches."""
        sums: dict[str, Tensor] = {}
        counts = step_counts(self.tasks, [targets for _, targets, _ in kept])
        for images, targets, camera in kept:
            with autocast_context(self.device, self.amp):
                out = self.core(images, **camera)
            for t, v in compute_losses(out.predictions, targets, self.tasks, counts=counts).items():
                sums[t] = sums.get(t, 0.0) + v.float() / len(kept)
        return sums

    # -------------------------------------------------------------------------------- one micro-batch
    def prescale(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The losses times their fixed `loss_weights`."""
        return {t: (self.loss_weights[t] * v if t in self.loss_weights else v) for t, v in losses.items()}

    def backward(
        self,
        losses: Mapping[str, Tensor],
        output: ModelOutput | None = None,
        step: int = 0,
        scale: float = 1.0,
        scaler: torch.amp.GradScaler | None = None,
        recompute: Callable[[str], Tensor] | None = None,
    ) -> Tensor:
        """Accumulate the gradient of `scale` x the objective into `.grad`; returns the (detached) scaled total.

        output: the model output the losses were computed from (its regularizers are added to the
        total; its shared representation and branch points feed the calibrator and GradNorm).
        recompute(task): that task's raw loss from a fresh forward of the same batch (needed only by
        the sharpness-aware step, `needs_recompute`)."""
        regularizers = list(output.regularizers.values()) if output is not None else []
        regularizer = torch.stack([r.float() for r in regularizers]).sum() if regularizers else None
        features = list(output.shared) if output is not None else []
        prescaled = self.prescale(losses)
        total, weights = self.weighting(prescaled, step, shared=self._gradnorm_tensors(features))
        # GradScaler's scale (scaling a one also creates the scale on first use, as scale(loss) would)
        loss_scale = float(scaler.scale(total.detach().new_ones(()))) if scaler is not None and scaler.is_enabled() else 1.0
        full = (total if regularizer is None else total + regularizer) * scale
        if self.calibrator is None:
            (scaler.scale(full) if scaler is not None else full).backward()
            self._record(weights, None)
            return full.detach()
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
        kwargs: dict[str, Any] = {"loss_scale": loss_scale}
        if output is not None:
            kwargs.update(features=output.shared, branches=output.branches)
        if self.needs_recompute:
            if recompute is None:
                raise ValueError("this calibration (sharpness-aware step) needs backward(..., recompute=...)")
            factors = {t: self.loss_weights.get(t, 1.0) * coef[t] * scale for t in tasks}
            kwargs["recompute"] = lambda t: recompute(t) * factors[t]
        stats = self.calibrator.backward(per_task, **kwargs)
        self._record(weights, stats)
        if not stats.finite and loss_scale == 1.0:
            # non-finite gradients: make the step be skipped (with a GradScaler, the inf/NaN gradients
            # make the scaler skip it and lower its scale, as for uncalibrated steps)
            full = full * float("nan")
        return full.detach()

    def _gradnorm_tensors(self, features: Sequence[Tensor]) -> list[Tensor] | None:
        """What GradNorm measures gradient norms on: the shared representation, else the last shared parameter."""
        if not self.weighting.needs_shared_grads:
            return None
        reps = [r for r in features if r.requires_grad]
        if reps or self.core is None:
            return reps
        return [p for p in self.core.shared_parameters() if p.requires_grad][-1:]

    def _regularizer_backward(self, regularizer: Tensor) -> None:
        """The regularizer's plain gradient into `.grad`; under DDP, the part that reaches parameters
        the calibrator averages itself is held apart and averaged in `sync_gradients`."""
        params = [p for p in self.calibrator.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(regularizer, params, retain_graph=True, allow_unused=True)
        if dist.world_size() < 2:
            accumulate_grads(params, grads)
            return
        # every rank holds every parameter (zeros where unused), so the all-reduce lines up
        self._held.append((params, flatten(params, [None if g is None else g.detach() for g in grads])))

    def zero_grad(self) -> None:
        """Forget regularizer gradients held for averaging (call with `optimizer.zero_grad()`)."""
        self._held.clear()

    def _unsynced_parameters(self, model: nn.Module | None) -> list[nn.Parameter]:
        """The parameters whose gradients `sync_gradients` averages, in a fixed order."""
        if model is None:
            return []
        done = {id(p) for p in self.calibrator.synced_parameters} if self.calibrator is not None else set()
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in done] if self.manual_sync else []
        return params + [p for p in self.weighting.extra_parameters() if p.requires_grad]

    def sync_gradients(self, model: nn.Module, present: Sequence[float] | None = None) -> None:
        """Average across ranks the gradients that are not averaged yet (call after the last micro-batch);
        `present`: their gradient presence summed over the ranks, when already known."""
        if dist.world_size() < 2:
            return
        average_gradients(self._unsynced_parameters(model), present)
        if self._held:
            params = self._held[0][0]
            flat = torch.stack([f for _, f in self._held]).sum(0)
            self._held.clear()
            dist.all_reduce_mean_(flat)
            accumulate_grads(params, split_flat(flat, params))

    # -------------------------------------------------------------------------------- hooks
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
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weighting.load_state_dict(state["weighting"])
        if self.calibrator is not None and state.get("calibrator") is not None:
            self.calibrator.load_state_dict(state["calibrator"])
        self.epoch = int(state.get("epoch", self.epoch))


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
    task_losses: Mapping[str, str] | None = None,
    **runtime: Any,
) -> MultiTaskObjective:
    """The objective a config describes, for the (unwrapped) multi-task `model`; `task_losses` swaps
    tasks' losses for named variants (`mtvision.tasks.with_loss`); `runtime` holds `step`'s keyword
    arguments (optimizer, scaler, grad_clip, amp, device, channels_last)."""
    method = make_weighting(weighting, list(tasks), **dict(weighting_options or {}))
    calibrator = (
        make_calibrator(model, calibration, level, sam_rho=sam_rho, **dict(calibration_options or {})) if calibration else None
    )
    model_tasks = getattr(model, "tasks", {})
    task_records = {t: model_tasks[t] for t in tasks if t in model_tasks}
    for t, variant in (task_losses or {}).items():
        if t not in task_records:
            raise ValueError(f"task_losses names task {t!r}, which the objective does not train ({list(task_records)})")
        task_records[t] = with_loss(task_records[t], variant)
    return MultiTaskObjective(method, calibrator, loss_weights, core=model, tasks=task_records, **runtime)
