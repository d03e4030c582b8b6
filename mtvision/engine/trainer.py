"""The training loop: `train(config)` runs one experiment end to end.

Single process or torchrun (DDP), with AMP, gradient accumulation, periodic validation, best-model
selection on the validation split, resumable checkpoints, SIGTERM/SIGINT handling, and a final
report on the test split.  Per-task losses go to `objective.backward`, the one place loss
weighting and gradient calibration plug into.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtvision import visualize
from mtvision.config import ExperimentConfig, OptimConfig, config_to_dict, save_config
from mtvision.data.sample import IMAGENET_MEAN, IMAGENET_STD
from mtvision.engine import distributed as dist
from mtvision.engine.checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from mtvision.engine.data import RunData, build_run_data
from mtvision.engine.evaluator import autocast_context, evaluate, predict_panels
from mtvision.engine.loggers import PredictionPanel, build_loggers, colour_pair, format_metrics_table
from mtvision.engine.objective import MultiTaskObjective, build_objective, check_objective, compute_losses
from mtvision.engine.progress import Progress
from mtvision.engine.schedule import WarmupSchedule, build_scheduler
from mtvision.engine.selection import Selector
from mtvision.errors import MTVisionError
from mtvision.metrics import load_references
from mtvision.models.config import ModelConfig
from mtvision.models.registry import create_model


class TrainingError(MTVisionError, RuntimeError):
    """Training cannot go on (too many non-finite losses, ...)."""


class RunFolderError(TrainingError, ValueError):
    """The output folder does not fit the request (in use without --resume/--overwrite, nothing to resume)."""


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    step: int
    interrupted: bool
    val_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    best_step: int | None = None
    pretrained_dir: Path | None = None
    skipped_steps: int = 0


# ---------------------------------------------------------------------------------------- set-up
def check_output_dir(path: str | Path, resume: bool, overwrite: bool) -> bool:
    """Whether `path` already holds a run; refuses one unless resuming or overwriting."""
    out = Path(path)
    used = out.exists() and any(out.iterdir())
    if used and not (resume or overwrite):
        raise RunFolderError(
            f"output_dir {str(out)!r} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    return used


def prepare_output_dir(path: str | Path, resume: bool, overwrite: bool, is_main: bool) -> Path:
    """The run folder, created (or emptied first with `overwrite`); see `check_output_dir`."""
    out = Path(path)
    if is_main:  # the other ranks ran check_output_dir at start-up; checking again would race the rmtree
        if check_output_dir(out, resume, overwrite) and overwrite and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def model_config_for(cfg: ExperimentConfig, num_classes: dict[str, int]) -> ModelConfig:
    """The model config of a run: the `model` section, with the run's tasks and class counts and
    preprocessing matching the training size."""
    section = dict(cfg.model)
    section.setdefault("tasks", {t: num_classes.get(t) for t in cfg.data.tasks})
    section.setdefault("preprocess", {"mode": "pad", "input_size": [cfg.data.height, cfg.data.width]})
    model_cfg = ModelConfig.from_dict(section)
    if list(model_cfg.tasks) != list(cfg.data.tasks):
        raise TrainingError(f"model.tasks {list(model_cfg.tasks)} must match data.tasks {cfg.data.tasks}")
    return model_cfg


def build_optimizer(
    model: nn.Module, cfg: ExperimentConfig, extra: list[nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD; no weight decay on biases and normalisation weights (1-D parameters).

    `extra`: the loss weighting's own parameters, a third group without weight decay at
    `optim.weighting.lr` (default `optim.lr`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if extra:
        groups.append({"params": list(extra), "weight_decay": 0.0, "lr": o.weighting.lr or o.lr})
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas))


def base_learning_rates(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig) -> list[float]:
    """The peak learning rate of each parameter group (the weighting's group has its own)."""
    o = cfg.optim
    return [o.lr, o.lr] + [o.weighting.lr or o.lr] * (len(optimizer.param_groups) - 2)


def make_objective(core: nn.Module, cfg: ExperimentConfig, device: torch.device) -> MultiTaskObjective:
    """The loss weighting and gradient calibration of `cfg.optim`, for the unwrapped model."""
    o = cfg.optim
    objective = build_objective(
        core,
        cfg.data.tasks,
        weighting=o.weighting.method,
        weighting_options=o.weighting.options,
        calibration=o.calibration.method,
        level=o.calibration.level,
        calibration_options=o.calibration.options,
        loss_weights=o.loss_weights,
        sam_rho=o.calibration.sam_rho,
    )
    objective.weighting.to(device)
    return objective


def make_schedule(o: OptimConfig, steps: int) -> WarmupSchedule:
    """The LR factor schedule of a run of `steps` optimizer steps."""
    return WarmupSchedule(steps, o.schedule, min(o.warmup_iters, steps), o.warmup_ratio, o.poly_power, o.min_lr / o.lr)


def total_steps(cfg: ExperimentConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps in the run, optimizer steps per epoch)."""
    steps_per_epoch = batches_per_epoch // cfg.train.grad_accum
    if steps_per_epoch < 1:
        raise TrainingError(
            f"an epoch has {batches_per_epoch} batches per process, fewer than train.grad_accum={cfg.train.grad_accum}: "
            "use more samples or a smaller batch"
        )
    if cfg.train.iterations is not None:
        return cfg.train.iterations, steps_per_epoch
    return cfg.train.epochs * steps_per_epoch, steps_per_epoch


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agree(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any process."""
    if not dist.world_size() > 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce_sum_(t)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------- the loop
def train(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int], None] | None = None,
    device: str = "auto",
) -> TrainResult:
    """Run the experiment `cfg`; `on_step(step)` is called after every optimizer step (for tests)."""
    cfg.validate()
    info = dist.init_distributed(device)
    try:
        with contextlib.ExitStack() as closing:  # loggers and progress bar close on errors too
            return _train(cfg, info, resume, overwrite, on_step, closing)
    finally:
        dist.cleanup()


def _train(
    cfg: ExperimentConfig, info: dist.DistInfo, resume: bool, overwrite: bool, on_step, closing: contextlib.ExitStack
) -> TrainResult:
    tc = cfg.train
    dev = info.device
    check_output_dir(cfg.output_dir, resume, overwrite)  # fail before any work
    dist.seed_everything(tc.seed, 0, tc.deterministic)  # identical initial weights on every rank

    # data and model first: a bad dataset or model config fails before the run folder is touched
    preprocess = cfg.model.get("preprocess") or {}
    mean, std = preprocess.get("mean", IMAGENET_MEAN), preprocess.get("std", IMAGENET_STD)
    data: RunData = build_run_data(cfg.data, tc.batch_size, mean, std, info.rank, info.world_size)
    model_cfg = model_config_for(cfg, data.num_classes)
    model = create_model(model_cfg).to(dev)
    o = cfg.optim
    check_objective(cfg.data.tasks, o.weighting.method, o.weighting.options, o.calibration.method,
                    o.calibration.level, o.calibration.options, o.calibration.sam_rho)

    out = prepare_output_dir(cfg.output_dir, resume, overwrite, info.is_main)
    ckpts = CheckpointManager(out, keep_last=tc.keep_last)
    start_ckpt = ckpts.latest() if resume else None
    if resume and start_ckpt is None:
        raise RunFolderError(f"--resume: no checkpoint found under {out / 'checkpoints'}")
    if info.is_main:
        save_config(cfg, out / "config.yaml")
    tasks = model.tasks
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tc.sync_bn and info.is_distributed and dev.type != "cuda":
        raise TrainingError("train.sync_bn needs CUDA (torch's SyncBatchNorm is GPU-only); on CPU use model.decoder_options.norm=gn")
    if info.is_distributed and tc.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    core = model  # the unwrapped model: checkpoints, exports, evaluation
    objective = make_objective(core, cfg, dev)
    optimizer = build_optimizer(core, cfg, objective.extra_parameters())
    steps, steps_per_epoch = total_steps(cfg, len(data.train))
    schedule = make_schedule(o, steps)
    scheduler = build_scheduler(optimizer, schedule)
    scaler = torch.amp.GradScaler(dev.type, enabled=tc.amp == "fp16")
    references = load_references(tc.references, list(tasks)) if tc.references else None
    selector = Selector(tc.select_metric, tasks, references=references)
    if info.is_distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)

    step, epoch, skipped, nonfinite_run = 0, 0, 0, 0
    val_metrics: dict[str, dict[str, float]] = {}
    if start_ckpt is not None:
        state = load_checkpoint(start_ckpt)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])  # this also overwrites `schedule`'s fields in place
        # the current config decides the schedule: a resumed run may be longer or use another lr
        schedule = make_schedule(o, steps)
        scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
        scheduler.base_lrs = base_learning_rates(optimizer, cfg)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * schedule(scheduler.last_epoch)
        scaler.load_state_dict(state["scaler"])
        objective.load_state_dict({"weighting": state["weighting"], "calibrator": state["calibrator"]})
        selector.load_state_dict(state["selection"])
        step, epoch, skipped = state["step"], state["epoch"], state["skipped_steps"]
        val_metrics = state.get("metrics") or {}
        saved_world = len(state["sampler"])
        # the sampler re-divides what was consumed when the number of processes changed
        data.sampler.load_state_dict(state["sampler"][info.rank if info.rank < saved_world else 0])
        if saved_world == info.world_size:
            restore_rng_state(state["rng"][info.rank])
        else:
            dist.seed_everything(tc.seed + 1 + step, info.rank, tc.deterministic)
            if info.is_main:
                print(f"resuming {saved_world}-process checkpoint with {info.world_size} process(es): "
                      "data order continues, random streams are reseeded", flush=True)
    else:
        data.sampler.set_epoch(0)
        dist.seed_everything(tc.seed + 1, info.rank, tc.deterministic)  # per-rank training randomness

    loggers = build_loggers(
        out,
        console=False,  # the loop prints its own tables
        wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        wandb_entity=cfg.logging.wandb_entity,
        wandb_run_name=cfg.logging.wandb_run_name,
        wandb_tags=cfg.logging.wandb_tags,
        config=config_to_dict(cfg),
        is_main_process=info.is_main,
    )
    closing.callback(loggers.close)
    if info.is_main:
        print(f"mtvision: {cfg.data.dataset} {cfg.data.tasks} | {model_cfg.backbone.name} + {model_cfg.decoder} | "
              f"{steps} steps ({steps_per_epoch}/epoch) | {info.world_size} process(es) on {dev} | output {out}", flush=True)

    def checkpoint_state() -> dict[str, Any]:
        samplers = dist.all_gather_objects(data.sampler.state_dict())
        rngs = dist.all_gather_objects(capture_rng_state())
        return {
            "model": core.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            **objective.state_dict(),  # "weighting" and "calibrator"
            "selection": selector.state_dict(),
            "rng": rngs,
            "sampler": samplers,
            "epoch": epoch,
            "step": step,
            "skipped_steps": skipped,
            "config": config_to_dict(cfg),
            "metrics": val_metrics,
        }

    def save(is_best: bool) -> None:
        state = checkpoint_state()  # every rank joins the gathers
        if info.is_main:
            ckpts.save(state, step, is_best=is_best)
        dist.barrier()

    def validate() -> None:
        nonlocal val_metrics
        if info.is_distributed:  # ranks' BatchNorm running stats drift apart: score rank 0's, the one saved
            for buffer in core.buffers():
                torch.distributed.broadcast(buffer, src=0)
        val_metrics = evaluate(core, data.val, tasks, data.meter_info, dev, tc.amp)
        score, best = selector.update(val_metrics, step)
        values = {f"val/{t}/{k}": v for t, m in val_metrics.items() for k, v in m.items()}
        values["val/score"] = score
        loggers.log_scalars(values, step)
        if info.is_main:
            print(f"\nvalidation at step {step} ({tc.select_metric} score {score:+.3f}{', best' if best else ''}):\n"
                  + format_metrics_table(val_metrics), flush=True)
            _log_pictures(core, data, tasks, dev, mean, std, cfg.logging.num_val_images, loggers, step, out)
        save(is_best=best)

    batches = _batches(data, epoch)
    progress = Progress(
        steps, "train", mode=cfg.logging.console, interval=cfg.logging.log_interval, enabled=info.is_main,
        images_per_step=tc.batch_size * tc.grad_accum * info.world_size,
    )
    closing.callback(progress.close)
    progress.update(step)
    window: dict[str, float] = {}
    window_aux = 0.0
    window_n, window_images, window_start = 0, 0, time.perf_counter()
    interrupted = False
    seen_epoch = epoch
    model.train()
    with StopSignal() as stop:
        while step < steps:
            optimizer.zero_grad(set_to_none=True)
            step_losses: dict[str, float] = {}
            step_aux = 0.0
            finite = True
            objective.zero_grad()
            kept: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # for FAMO's second forward
            for micro in range(tc.grad_accum):
                epoch, batch = next(batches)
                if epoch != seen_epoch and micro == 0:  # an epoch ended (DWA and IGB update their weights)
                    objective.end_epoch()  # (mid-step, it waits for the step's end: one step, one set of weights)
                    seen_epoch = epoch
                images = batch["image"].to(dev, non_blocking=True)
                if tc.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                targets = {t: batch[t].to(dev, non_blocking=True) for t in tasks}
                sync = not objective.manual_sync and (micro == tc.grad_accum - 1 or not info.is_distributed)
                with (nullcontext() if sync or not info.is_distributed else model.no_sync()), autocast_context(dev, tc.amp):
                    outputs = model(images)
                losses = compute_losses(outputs, targets, tasks)
                recompute = _recompute_fn(core, images, targets, tasks, dev, tc.amp) if objective.needs_recompute else None
                regularizer = outputs.get("moe_aux_loss")  # MoE load balancing: not a task (docs/optimisers)
                total = objective.backward(
                    losses, step=step, scale=1.0 / tc.grad_accum, scaler=scaler if tc.amp == "fp16" else None,
                    recompute=recompute, regularizer=regularizer,
                )
                if regularizer is not None:
                    step_aux += float(regularizer.detach()) / tc.grad_accum
                finite &= bool(torch.isfinite(total))
                for t, v in losses.items():
                    step_losses[t] = step_losses.get(t, 0.0) + float(v.detach()) / tc.grad_accum
                if objective.needs_losses_after_step:
                    kept.append((images, targets))
                data.sampler.advance(images.shape[0])
                window_images += images.shape[0] * info.world_size
            stepped = not _agree(not finite, dev)
            if stepped:
                nonfinite_run = 0
                objective.sync_gradients(core)
                if tc.amp == "fp16":
                    scaler.unscale_(optimizer)
                if o.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(core.parameters(), o.grad_clip)
                if tc.amp == "fp16":
                    scale_before = scaler.get_scale()
                    scaler.step(optimizer)
                    scaler.update()
                    stepped = scaler.get_scale() >= scale_before  # a lowered scale: GradScaler skipped it
                else:
                    optimizer.step()
            else:
                skipped += 1
                nonfinite_run += 1
                optimizer.zero_grad(set_to_none=True)
                if info.is_main:
                    print(f"\nstep {step}: non-finite loss {step_losses}; step skipped ({nonfinite_run} in a row)", flush=True)
                if nonfinite_run >= tc.max_nonfinite_steps:
                    raise TrainingError(
                        f"{nonfinite_run} consecutive steps had non-finite losses (last: {step_losses}); stopping. "
                        "Lower optim.lr, enable optim.grad_clip, or check the data."
                    )
            objective.after_step(_losses_after(core, kept, tasks, dev, tc.amp) if stepped and kept else None)
            if epoch != seen_epoch:
                objective.end_epoch()
                seen_epoch = epoch
            scheduler.step()
            step += 1
            for t, v in step_losses.items():
                window[t] = window.get(t, 0.0) + v
            window_aux += step_aux
            window_n += 1
            loss_sum = sum(step_losses.values())
            lr = optimizer.param_groups[0]["lr"]
            progress.update(1, loss=loss_sum, lr=lr, **objective.progress_postfix())
            if step % cfg.logging.log_interval == 0 or step == steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                scalars = {f"train/loss/{t}": v / window_n for t, v in window.items()}
                if window_aux:
                    scalars["train/moe_aux_loss"] = window_aux / window_n
                scalars.update({"train/loss": sum(window.values()) / window_n, "train/lr": lr, "train/images_per_s": window_images / elapsed,
                                "train/epoch": epoch, "train/skipped_steps": skipped})
                scalars.update({f"train/{k}": v for k, v in objective.consume_log().items()})
                scalars.update(decoder_scalars(core))
                loggers.log_scalars(scalars, step)
                window, window_n, window_images, window_start, window_aux = {}, 0, 0, time.perf_counter(), 0.0
            if on_step is not None:
                on_step(step)
            if step % tc.eval_interval == 0 or step == steps:
                validate()
            if _agree(stop.requested, dev) and step < steps:
                interrupted = True
                save(is_best=False)
                if info.is_main:
                    print(f"\nstopped by signal at step {step}; resume with --resume", flush=True)
                break
    progress.close()

    result = TrainResult(out, step, interrupted, val_metrics, best_step=selector.best_step, skipped_steps=skipped)
    if not interrupted:
        result.test_metrics, result.pretrained_dir = _finish(core, ckpts, data, tasks, dev, tc.amp, out, info, loggers, step)
        result.best_step = selector.best_step
    return result


def expert_usage_scalars(core: nn.Module) -> dict[str, float]:
    """Expert balance since the last call, for mixture-of-experts decoders (then their counters reset):
    per layer and task, each expert's share of the load as `train/experts/<layer>/<task>/e<i>`, the
    smallest share (`.../min_share`, 0 = a dead expert) and cv² of the load."""
    decoder = getattr(core, "decoder", core)
    if not hasattr(decoder, "expert_usage"):
        return {}
    out: dict[str, float] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}", value)
            return
        load = node.detach().double().reshape(-1).cpu()
        total = float(load.sum())
        if total <= 0:
            return
        share = load / total
        for i, v in enumerate(share.tolist()):
            out[f"train/experts{prefix}/e{i}"] = v
        out[f"train/experts{prefix}/min_share"] = float(share.min())
        out[f"train/experts{prefix}/cv2"] = float(load.var(unbiased=False) / load.mean() ** 2)

    walk("", decoder.expert_usage())
    if hasattr(decoder, "reset_expert_usage"):
        decoder.reset_expert_usage()
    return out


def decoder_scalars(core: nn.Module) -> dict[str, float]:
    """What a decoder reports about its own state (`training_scalars()`, e.g. TAPS's open layers), and
    its expert balance (`expert_usage()`), as `train/...` scalars."""
    decoder = getattr(core, "decoder", core)
    out = expert_usage_scalars(core)
    if hasattr(decoder, "training_scalars"):
        out.update({f"train/{k}": float(v) for k, v in decoder.training_scalars().items()})
    return out


def _recompute_fn(core: nn.Module, images, targets, tasks, dev: torch.device, amp: str):
    """recompute(task): `task`'s loss from a fresh forward of this batch that runs only its path."""

    def recompute(task: str) -> torch.Tensor:
        with autocast_context(dev, amp):
            outputs = core(images, tasks=[task])
        return compute_losses(outputs, targets, {task: tasks[task]})[task]

    return recompute


@torch.no_grad()
def _losses_after(core: nn.Module, kept, tasks, dev: torch.device, amp: str) -> dict[str, torch.Tensor]:
    """The step's per-task losses recomputed by the updated model (train mode, as FAMO's code does),
    averaged over its micro-batches."""
    sums: dict[str, torch.Tensor] = {}
    for images, targets in kept:
        with autocast_context(dev, amp):
            outputs = core(images)
        for t, v in compute_losses(outputs, targets, tasks).items():
            sums[t] = sums.get(t, 0.0) + v.float() / len(kept)
    return sums


def _batches(data: RunData, epoch: int):
    """Endless (epoch, batch) pairs; the sampler carries the epoch and the position within it."""
    while True:
        if data.sampler.epoch != epoch:
            data.sampler.set_epoch(epoch)
        if data.sampler.remaining >= data.train.batch_size:  # a finished epoch would restart: skip it
            for batch in data.train:
                yield epoch, batch
        epoch += 1


def _log_pictures(core, data: RunData, tasks, dev, mean, std, limit: int, loggers, step: int, out: Path) -> None:
    """A few validation predictions: to the loggers (W&B) and as `predictions.png` in the run folder."""
    if limit <= 0:
        return
    batch = next(iter(data.val))
    panels = predict_panels(core, batch, tasks, dev, mean, std, limit)
    loggers.log_predictions(step, [PredictionPanel(class_names=data.class_names or None, **p) for p in panels])
    rows = []
    for p in panels:
        row = [p["image"]]
        for name in tasks:
            row += list(colour_pair(name, p["targets"][name], p["predictions"][name]))  # one colour scale
        rows.append(row)
    titles = ["image"] + [f"{n} {kind}" for n in tasks for kind in ("gt", "pred")]
    visualize.save_png(str(out / "predictions.png"), visualize.image_grid(rows, titles=titles))


def _finish(core, ckpts: CheckpointManager, data: RunData, tasks, dev, amp: str, out: Path, info, loggers, step: int):
    """Load the best checkpoint, report the test split, export the pretrained folder."""
    best = ckpts.best()
    if best is not None:
        core.load_state_dict(load_checkpoint(best)["model"])
    test_metrics = evaluate(core, data.test, tasks, data.meter_info, dev, amp)
    pretrained = out / "model"
    if info.is_main:
        core.save_pretrained(pretrained)
        loggers.log_scalars({f"test/{t}/{k}": v for t, m in test_metrics.items() for k, v in m.items()}, step)
        loggers.log_artifact(pretrained, name="model", kind="model", aliases=["best"])
        print("\ntest split (best validation checkpoint):\n" + format_metrics_table(test_metrics), flush=True)
        print(f"pretrained model: {pretrained}  (mtvision.load({str(pretrained)!r}))", flush=True)
        print(f"predictions: {out / 'predictions.png'}", flush=True)
    dist.barrier()
    return test_metrics, pretrained

