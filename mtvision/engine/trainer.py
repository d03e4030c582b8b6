"""The training loop: `train(config)` runs one experiment end to end.

Single process or torchrun (DDP), with AMP, gradient accumulation, periodic validation, best-model
selection on the validation split, resumable checkpoints, SIGTERM/SIGINT handling, and a final
report on the test split.  `setup_run` builds everything a run needs (`Run`); `_loop` reads top to
bottom: take the step's micro-batches, set the learning rate from `schedule(step)`, let the
objective run the step, log, validate, stop.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtvision import distributed as dist
from mtvision import visualize
from mtvision.config import ExperimentConfig, OptimConfig, config_to_dict, save_config
from mtvision.engine.benchmark import LastEpochsReport
from mtvision.engine.checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from mtvision.engine.data import RunData, build_run_data, eval_loader, evaluation_set
from mtvision.engine.evaluator import evaluate, predict_panels
from mtvision.engine.loggers import LoggerGroup, PredictionPanel, build_loggers, colour_pair, format_metrics_table
from mtvision.engine.objective import MultiTaskObjective, build_objective, check_objective
from mtvision.engine.progress import Progress
from mtvision.engine.run_folder import RunFolderError, RunLock, check_output_dir, check_writable, prepare_output_dir
from mtvision.engine.schedule import WarmupSchedule
from mtvision.engine.selection import Selector
from mtvision.engine.window import LogWindow
from mtvision.errors import MTVisionError
from mtvision.metrics import load_references
from mtvision.models.config import ModelConfig
from mtvision.models.multitask import MultiTaskModel
from mtvision.models.registry import create_model


class TrainingError(MTVisionError, RuntimeError):
    """Training cannot go on (too many non-finite losses, ...)."""


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
    benchmark: dict[str, Any] = field(default_factory=dict)  # a benchmark's last-epochs report


# ---------------------------------------------------------------------------------------- set-up
def model_config_for(cfg: ExperimentConfig, num_classes: dict[str, int]) -> ModelConfig:
    """The model config of a run: the `model` section, with the run's tasks and class counts and
    preprocessing matching the training size where the section leaves them out."""
    model_cfg = cfg.model.resolved(cfg.data.tasks, num_classes, (cfg.data.height, cfg.data.width))
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


def make_schedule(o: OptimConfig, steps: int, steps_per_epoch: int = 1) -> WarmupSchedule:
    """The LR factor schedule of a run of `steps` optimizer steps: `schedule(step)` (a warm-up
    longer than the run is cut to the run, with a warning; the step schedule's epochs become steps)."""
    if o.warmup_iters > steps:
        warnings.warn(f"optim.warmup_iters={o.warmup_iters} is longer than the run ({steps} steps): the warm-up "
                      f"is cut to {steps} steps, so the peak learning rate is reached only at the end", stacklevel=2)
    return WarmupSchedule(steps, o.schedule, min(o.warmup_iters, steps), o.warmup_ratio, o.poly_power, o.min_lr / o.lr,
                          tuple(int(e) * steps_per_epoch for e in o.step_epochs), o.step_gamma)


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
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (main thread only); a
    second Ctrl-C (or signal) while the stop is pending force-quits at once (KeyboardInterrupt)."""

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
        if self.requested:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name} while stopping: force-quit")
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to quit at once, without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything one training run works with, built by `setup_run`."""

    cfg: ExperimentConfig
    info: dist.DistInfo
    out: Path
    data: RunData
    core: MultiTaskModel
    model: nn.Module
    objective: MultiTaskObjective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: WarmupSchedule
    base_lrs: list[float]
    selector: Selector
    ckpts: CheckpointManager
    loggers: LoggerGroup
    steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    skipped: int = 0
    val_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    last_epochs: LastEpochsReport | None = None

    def checkpoint_state(self) -> dict[str, Any]:
        """The training state of this step (every rank joins the gathers)."""
        samplers = dist.all_gather_objects(self.data.sampler.state_dict())
        rngs = dist.all_gather_objects(capture_rng_state())
        return {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.objective.state_dict(),  # "weighting", "calibrator", "epoch" of the objective
            "selection": self.selector.state_dict(),
            "rng": rngs,
            "sampler": samplers,
            "epoch": self.epoch,
            "step": self.step,
            "skipped_steps": self.skipped,
            "config": config_to_dict(self.cfg),
            "metrics": self.val_metrics,
            "last_epochs": self.last_epochs.state_dict() if self.last_epochs is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (the current config decides the schedule and the run length)."""
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state)
        self.selector.load_state_dict(state["selection"])
        self.step, self.epoch, self.skipped = state["step"], state["epoch"], state["skipped_steps"]
        self.val_metrics = state.get("metrics") or {}
        if self.last_epochs is not None and state.get("last_epochs"):
            self.last_epochs.load_state_dict(state["last_epochs"])
        saved_world, info = len(state["sampler"]), self.info
        # the sampler re-divides what was consumed when the number of processes changed
        self.data.sampler.load_state_dict(state["sampler"][info.rank if info.rank < saved_world else 0])
        if saved_world == info.world_size:
            restore_rng_state(state["rng"][info.rank])
        else:
            dist.seed_everything(self.cfg.train.seed + 1 + self.step, info.rank, self.cfg.train.deterministic)
            if info.is_main:
                print(f"resuming {saved_world}-process checkpoint with {info.world_size} process(es): "
                      "data order continues, random streams are reseeded", flush=True)

    def save(self, is_best: bool) -> None:
        state = self.checkpoint_state()
        if self.info.is_main:
            self.ckpts.save(state, self.step, is_best=is_best)
        dist.barrier()

    def set_learning_rate(self) -> float:
        """Set every group's learning rate for the current step from `schedule(step)`; returns the first."""
        factor = self.schedule(self.step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def eval_progress(self, loader, desc: str) -> Progress:
        """A progress bar (main process only) over an evaluation loader."""
        return Progress(len(loader), desc, mode=self.cfg.logging.console, interval=max(1, len(loader) // 4),
                        enabled=self.info.is_main)

    def validate(self) -> None:
        """Score the validation split, log it, pictures, and a checkpoint (marked best when it is);
        without a validation split, only the checkpoint."""
        cfg, info, core = self.cfg, self.info, self.core
        if self.data.val is None:
            self.save(is_best=False)
            return
        if info.is_distributed:  # ranks' BatchNorm running stats drift apart: score rank 0's, the one saved
            for buffer in core.buffers():
                torch.distributed.broadcast(buffer, src=0)
        with self.eval_progress(self.data.val, "validation") as bar:
            self.val_metrics = evaluate(core, self.data.val, core.tasks, self.data.meter_info, info.device, cfg.train.amp, bar)
        score, best = self.selector.update(self.val_metrics, self.step)
        values = {f"val/{t}/{k}": v for t, m in self.val_metrics.items() for k, v in m.items()}
        self.loggers.log_scalars({**values, "val/score": score}, self.step)
        if info.is_main:
            print(f"\nvalidation at step {self.step} ({cfg.train.select_metric} score {score:+.3f}{', best' if best else ''}):\n"
                  + format_metrics_table(self.val_metrics), flush=True)
            _log_pictures(self, cfg.logging.num_val_images)
        self.save(is_best=best)


def setup_run(
    cfg: ExperimentConfig, info: dist.DistInfo, resume: bool | str | Path, overwrite: bool, closing: contextlib.ExitStack
) -> Run:
    """Data, model, objective, optimizer, checkpoints and loggers of a run (resumed when asked).
    A bad dataset, model or method fails before the run folder is touched."""
    tc, o, dev = cfg.train, cfg.optim, info.device
    if info.is_main:  # fail before any work: a folder that cannot be written, or in use by another run
        check_writable(cfg.output_dir)
        RunLock(cfg.output_dir).check()
    check_output_dir(cfg.output_dir, bool(resume), overwrite)
    dist.seed_everything(tc.seed, 0, tc.deterministic)  # identical initial weights on every rank
    pre = cfg.model.preprocess
    data = build_run_data(cfg.data, tc.batch_size, pre.mean, pre.std, info.rank, info.world_size)
    model_cfg = model_config_for(cfg, data.num_classes)
    core = create_model(model_cfg).to(dev)
    check_objective(cfg.data.tasks, o.weighting.method, o.weighting.options, o.calibration.method,
                    o.calibration.level, o.calibration.options, o.calibration.sam_rho)
    out = prepare_output_dir(cfg.output_dir, bool(resume), overwrite, info.is_main)
    if info.is_main:  # checked at start-up; taken once the data and the model are built
        lock = RunLock(out)
        lock.acquire()
        closing.callback(lock.release)
    ckpts = CheckpointManager(out, keep_last=tc.keep_last)
    start = ckpts.latest() if resume is True else (Path(resume) if resume else None)
    if resume is True and start is None:
        raise RunFolderError(f"--resume: no checkpoint found under {out / 'checkpoints'}")
    if start is not None and not start.is_dir():
        raise RunFolderError(f"--resume {str(start)!r}: no such checkpoint folder (see {out / 'checkpoints'})")
    if tc.channels_last:
        core = core.to(memory_format=torch.channels_last)
    if tc.sync_bn and info.is_distributed and dev.type != "cuda":
        raise TrainingError("train.sync_bn needs CUDA (torch's SyncBatchNorm is GPU-only); on CPU use model.decoder_options.norm=gn")
    if info.is_distributed and tc.sync_bn:
        core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    scaler = torch.amp.GradScaler(dev.type, enabled=tc.amp == "fp16")
    objective = build_objective(
        core, cfg.data.tasks, o.weighting.method, o.weighting.options, o.calibration.method, o.calibration.level,
        o.calibration.options, o.loss_weights, o.calibration.sam_rho, o.task_losses,
        scaler=scaler, grad_clip=o.grad_clip, amp=tc.amp, device=dev, channels_last=tc.channels_last,
    )
    objective.weighting.to(dev)
    optimizer = build_optimizer(core, cfg, objective.extra_parameters())
    objective.optimizer = optimizer
    steps, steps_per_epoch = total_steps(cfg, len(data.train))
    references = load_references(tc.references, list(core.tasks)) if tc.references else None
    model: nn.Module = core
    if info.is_distributed:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[dev.index] if dev.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)
    run = Run(cfg, info, out, data, core, model, objective, optimizer, scaler, make_schedule(o, steps, steps_per_epoch),
              base_learning_rates(optimizer, cfg), Selector(tc.select_metric, core.tasks, references=references),
              ckpts, LoggerGroup(), steps, steps_per_epoch)
    run.last_epochs = LastEpochsReport.for_run(data.meter_info, core.tasks, steps, steps_per_epoch)
    if start is not None:
        run.restore(load_checkpoint(start))
    else:
        data.sampler.set_epoch(0)
        dist.seed_everything(tc.seed + 1, info.rank, tc.deterministic)  # per-rank training randomness
    if info.is_main:  # only now: a resume that fails leaves the folder as it was
        save_config(cfg, out / "config.yaml")
    run.loggers = build_loggers(
        out, wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project, wandb_entity=cfg.logging.wandb_entity,
        wandb_run_name=cfg.logging.wandb_run_name, wandb_tags=cfg.logging.wandb_tags,
        tensorboard=cfg.logging.tensorboard, resume=start is not None, config=config_to_dict(cfg),
        is_main_process=info.is_main,
    )
    closing.callback(run.loggers.close)
    if info.is_main:
        extra = " + 3D-aware regulariser (training only)" if model_cfg.regularizer3d is not None else ""
        print(f"mtvision: {cfg.data.dataset} {cfg.data.tasks} | {model_cfg.backbone.name} + {model_cfg.decoder}{extra} | "
              f"{steps} steps ({steps_per_epoch}/epoch) | {info.world_size} process(es) on {dev} | output {out}", flush=True)
    return run


# ---------------------------------------------------------------------------------------- the loop
def train(
    cfg: ExperimentConfig,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    on_step: Callable[[int], None] | None = None,
    device: str = "auto",
) -> TrainResult:
    """Run the experiment `cfg`; `resume`: True for the last checkpoint of `cfg.output_dir`, or a
    checkpoint folder; `on_step(step)` is called after every optimizer step (for tests)."""
    cfg.validate()
    info = dist.init_distributed(device)
    try:
        with contextlib.ExitStack() as closing:  # loggers and progress bar close on errors too
            return _loop(setup_run(cfg, info, resume, overwrite, closing), on_step, closing)
    finally:
        dist.cleanup()


def _loop(run: Run, on_step: Callable[[int], None] | None, closing: contextlib.ExitStack) -> TrainResult:
    cfg, info, tc = run.cfg, run.info, run.cfg.train
    log_every = cfg.logging.log_interval
    progress = closing.enter_context(Progress(
        run.steps, "train", mode=cfg.logging.console, interval=log_every, enabled=info.is_main,
        images_per_step=tc.batch_size * tc.grad_accum * info.world_size, initial=run.step,
    ))
    batches = _batches(run.data, run.epoch)
    window = LogWindow()
    nonfinite_run, interrupted = 0, False
    run.model.train()
    with StopSignal() as stop:
        while run.step < run.steps:
            micro = [next(batches) for _ in range(tc.grad_accum)]
            lr = run.set_learning_rate()
            record = run.objective.step(run.model, [b for _, b in micro], run.step,
                                        epochs=[e for e, _ in micro], stop=stop.requested)
            run.data.sampler.advance(record.images)
            run.epoch = micro[-1][0]
            if record.nonfinite:
                run.skipped += 1
                nonfinite_run += 1
                if info.is_main:
                    print(f"\nstep {run.step}: non-finite loss; step skipped ({nonfinite_run} in a row)", flush=True)
                if nonfinite_run >= tc.max_nonfinite_steps:
                    raise TrainingError(
                        f"{nonfinite_run} consecutive steps had non-finite losses; stopping. "
                        "Lower optim.lr, enable optim.grad_clip, or check the data."
                    )
            else:
                nonfinite_run = 0
                window.add(record)
            run.step += 1
            if run.step % log_every == 0 or run.step == run.steps:
                scalars = window.flush(world_size=info.world_size)
                scalars.update({"train/lr": lr, "train/epoch": run.epoch, "train/skipped_steps": run.skipped})
                scalars.update({f"train/{k}": v for k, v in run.objective.consume_log().items()})
                scalars.update({f"train/{k}": float(v) for k, v in run.core.state_scalars().items()})
                run.loggers.log_scalars(scalars, run.step)
                progress.postfix.update(loss=scalars.get("train/loss", float("nan")), lr=lr, **run.objective.progress_postfix())
            progress.update(1)
            if on_step is not None:
                on_step(run.step)
            if run.last_epochs is not None and run.last_epochs.due(run.step):  # before the checkpoint
                run.last_epochs.record(run.core, run.data.test, info.device, run.step, tc.amp)
            if run.step % tc.eval_interval == 0 or run.step == run.steps:
                run.validate()
            # one process stops after the step in which the signal came; under DDP the ranks agree on it
            # in the next step's one all-reduce (torchrun and schedulers signal every rank)
            if (record.stop or (stop.requested and not info.is_distributed)) and run.step < run.steps:
                interrupted = True
                run.save(is_best=False)
                if info.is_main:
                    print(f"\nstopped by signal at step {run.step}; resume with --resume", flush=True)
                break
    progress.close()
    result = TrainResult(run.out, run.step, interrupted, run.val_metrics, best_step=run.selector.best_step,
                         skipped_steps=run.skipped)
    if not interrupted:
        result.test_metrics, result.pretrained_dir = _finish(run)
        if run.last_epochs is not None and info.is_main:  # next to the held-out selection's test report
            result.benchmark = run.last_epochs.summary()
            run.loggers.log_scalars(run.last_epochs.scalars(), run.step)
            print("\n" + run.last_epochs.format(), flush=True)
    return result


def _batches(data: RunData, epoch: int):
    """Endless (epoch, batch) pairs; the sampler carries the epoch and the position within it."""
    while True:
        if data.sampler.epoch != epoch:
            data.sampler.set_epoch(epoch)
        if data.sampler.remaining >= data.train.batch_size:  # a finished epoch would restart: skip it
            for batch in data.train:
                yield epoch, batch
        epoch += 1


def _log_pictures(run: Run, limit: int) -> None:
    """A few validation predictions: to the loggers (W&B) and as `predictions.png` in the run folder."""
    if limit <= 0:
        return
    tasks, pre = run.core.tasks, run.cfg.model.preprocess
    batch = next(iter(run.data.val))
    panels = predict_panels(run.core, batch, tasks, run.info.device, pre.mean, pre.std, limit)
    run.loggers.log_predictions(run.step, [PredictionPanel(class_names=run.data.class_names or None, **p) for p in panels])
    rows = []
    for p in panels:
        row = [p["image"]]
        for name in tasks:
            row += list(colour_pair(name, p["targets"][name], p["predictions"][name]))  # one colour scale
        rows.append(row)
    titles = ["image"] + [f"{n} {kind}" for n in tasks for kind in ("gt", "pred")]
    visualize.save_png(str(run.out / "predictions.png"), visualize.image_grid(rows, titles=titles))


def _plain_training_images(run: Run) -> Iterator[torch.Tensor]:
    """The training split's images in order, with evaluation transforms (no augmentation), on the
    run's device; the same batches on every rank.  Nothing is built until the first batch is asked."""
    pre = run.core.config.preprocess
    dataset, _ = evaluation_set(run.cfg.data, run.cfg.data.train_split, pre.mean, pre.std)
    for batch in eval_loader(dataset, run.cfg.train.batch_size, run.cfg.data):
        yield batch["image"].to(run.info.device, non_blocking=True)


def _finish(run: Run) -> tuple[dict[str, dict[str, float]], Path]:
    """Report the test split with the weights `train.select` chooses, export the pretrained folder."""
    core, info = run.core, run.info
    best = run.ckpts.best() if run.cfg.train.select == "best" else None
    if best is not None:
        core.load_state_dict(load_checkpoint(best)["model"])
        which, alias = f"best validation checkpoint, step {run.selector.best_step}", "best"
    elif run.cfg.train.select == "best":
        which, alias = "last iteration: no validation gave a usable score, so no best checkpoint was chosen", "last"
    else:
        which, alias = "last iteration (train.select: last)", "last"
    note = core.decoder.finish_training(_plain_training_images(run))
    if note and info.is_main:
        print(f"\n{note}", flush=True)
    with run.eval_progress(run.data.test, "test") as bar:
        test_metrics = evaluate(core, run.data.test, core.tasks, run.data.meter_info, info.device, run.cfg.train.amp, bar)
    pretrained = run.out / "model"
    if info.is_main:
        core.save_pretrained(pretrained)
        run.loggers.log_scalars({f"test/{t}/{k}": v for t, m in test_metrics.items() for k, v in m.items()}, run.step)
        run.loggers.log_artifact(pretrained, name="model", kind="model", aliases=[alias])
        print(f"\ntest split ({which}):\n" + format_metrics_table(test_metrics), flush=True)
        print(f"pretrained model: {pretrained}  (mtvision.load({str(pretrained)!r}))", flush=True)
        if (run.out / "predictions.png").is_file():
            print(f"predictions: {run.out / 'predictions.png'}", flush=True)
    dist.barrier()
    return test_metrics, pretrained
