"""The run-level configs: data, optimisation, training loop, logging and the model, as one
`ExperimentConfig` read with `mtvision.config_io.load_config` (strict: unknown keys name the closest
valid dotted key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mtvision.config_io import (
    ConfigError,
    UnknownKeyError,
    apply_overrides,
    config_to_dict,
    deep_merge,
    from_dict,
    load_config,
    read_config_file,
    save_config,
)
from mtvision.data.registry import DATASETS
from mtvision.errors import UnknownNameError, closest
from mtvision.models.config import ModelConfig
from mtvision.tasks import get_task, with_loss

__all__ = [
    "CalibrationConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LoggingConfig",
    "OptimConfig",
    "TrainConfig",
    "UnknownKeyError",
    "WeightingConfig",
    "apply_overrides",
    "config_to_dict",
    "deep_merge",
    "from_dict",
    "load_config",
    "read_config_file",
    "save_config",
]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """What to train and evaluate on.

    Attributes:
        dataset: a name from `mtvision.data.registry.DATASETS`: "synthetic" (procedural scenes, no
            files), "nyud" or "pascal".
        root: dataset folder (required for nyud and pascal).
        tasks: task names from `mtvision.tasks`, in output order.
        train_split: split used for training.
        val_split: held-out split used for validation and model selection (never the test split);
            None: no validation (with train.select "last", as the releases train on the full split).
        test_split: split used for the final evaluation only.
        holdout_fraction: when > 0, validate on this last fraction of train_split instead of val_split
            (for NYUD and PASCAL, whose public "val" split is the reported test set).
        height: training crop height in pixels.
        width: training crop width in pixels.
        scale_range: random scale range (lo, hi) of the training augmentation.
        rotation: maximum angle in degrees of a random rotation of the training images (uniform in
            +-rotation, about the centre, normals turned with them; the MTI-Net / PAD-Net releases
            use 20 on PASCAL); 0: none.
        cat_max_ratio: random training crops are redrawn (up to 10 times) unless at least two
            semseg classes are in them and none covers this fraction of their labelled pixels (the
            InvPT / TaskPrompter releases: 0.75); 1: no check.
        flip: random horizontal flips during training.
        photometric: photometric distortion of the training image.
        num_samples: synthetic dataset sizes by split name (train/val/test splits must all be listed).
        seed: seed of the synthetic scenes and of data shuffling.
        num_workers: data-loader worker processes per training process.
        pin_memory: pinned host memory for batches (worth enabling when training on CUDA).
        assumed_hfov: for datasets without camera intrinsics (PASCAL-Context), the horizontal field
            of view in degrees of a pinhole camera assumed for every image (principal point at the
            centre, square pixels), so that the 3D-aware regulariser can cast rays; samples with
            their own intrinsics keep them.  None (default): no camera is assumed.
    """

    dataset: str = "synthetic"
    root: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["semseg", "depth", "normals", "edge"])
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str = "test"
    holdout_fraction: float = 0.0
    height: int = 128
    width: int = 160
    scale_range: tuple[float, float] = (0.5, 2.0)
    rotation: float = 0.0
    cat_max_ratio: float = 1.0
    flip: bool = True
    photometric: bool = True
    num_samples: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 200, "test": 200})
    seed: int = 0
    num_workers: int = 2
    pin_memory: bool = False
    assumed_hfov: float | None = None

    def validate(self) -> None:
        """Raise ConfigError (UnknownNameError for tasks) on inconsistent values."""
        if self.dataset not in DATASETS:
            hint = closest(self.dataset, list(DATASETS))
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"data.dataset {self.dataset!r} is unknown{extra} (valid: {', '.join(DATASETS)})")
        _check(
            self.dataset == "synthetic" or bool(self.root), f"data.root is required for data.dataset={self.dataset!r}"
        )
        _check(bool(self.tasks), "data.tasks needs at least one task")
        _check(len(set(self.tasks)) == len(self.tasks), f"data.tasks has duplicates: {self.tasks}")
        for task in self.tasks:
            try:
                get_task(task)
            except UnknownNameError as exc:
                raise UnknownNameError(f"data.tasks: {exc}") from exc
        _check(self.height >= 8 and self.width >= 8, f"data.height/width must be >= 8, got {self.height}x{self.width}")
        lo, hi = self.scale_range
        _check(0 < lo <= hi, f"data.scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        _check(0 <= self.rotation <= 180, f"data.rotation must be in [0, 180] degrees, got {self.rotation}")
        _check(0 < self.cat_max_ratio <= 1, f"data.cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(0 <= self.holdout_fraction < 1, f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        _check(self.assumed_hfov is None or 0 < self.assumed_hfov < 180,
               f"data.assumed_hfov must be null or in (0, 180) degrees, got {self.assumed_hfov}")
        splits = {self.train_split, self.test_split}
        if self.holdout_fraction == 0 and self.val_split is not None:
            splits.add(self.val_split)
            _check(
                self.val_split != self.test_split,
                "data.val_split must differ from data.test_split (no selection on test)",
            )
        if self.dataset == "synthetic":
            missing = sorted(splits - set(self.num_samples))
            _check(not missing, f"data.num_samples needs a size for split(s) {missing}")
            bad = {k: v for k, v in self.num_samples.items() if v < 1}
            _check(not bad, f"data.num_samples must be positive, got {bad}")


@dataclass
class WeightingConfig:
    """Loss weighting (`mtvision.optim.weighting`), applied after `optim.loss_weights`.

    Attributes:
        method: "ew", "fixed", "uw", "dwa", "gradnorm", "rlw", "gls", "log", "famo" or "igb".
        options: the method's keyword options (e.g. {alpha: 1.5} for gradnorm, {temperature: 2.0} for dwa).
        lr: learning rate of the method's own parameters (UW's log-variances, GradNorm's weights);
            None: optim.lr, following the schedule like every other parameter group.
    """

    method: str = "ew"
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None

    def validate(self) -> None:
        from mtvision.optim.weighting import WEIGHTINGS

        if self.method not in WEIGHTINGS:
            hint = closest(self.method, list(WEIGHTINGS))
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"optim.weighting.method {self.method!r} is unknown{extra} (valid: {', '.join(WEIGHTINGS)})")
        _check(self.lr is None or self.lr > 0, f"optim.weighting.lr must be > 0 or null, got {self.lr}")


@dataclass
class CalibrationConfig:
    """Gradient calibration (`mtvision.optim.calibrator`).

    Attributes:
        method: an aggregator ("mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad",
            "gradvac", "fairgrad", "sdmgrad", "ntkmtl", "ew"), "graddrop", or a gradient-tracking method
            ("db_mtl", "moco", "excess_mtl"; level "params" only); None: no calibration (one plain
            backward pass).
        level: "features" (per-task gradients at the shared representation, about one backward pass),
            "params" (over the shared parameters, T backward passes) or "fuller" (features, then the
            gradient magnitudes entering each backbone scale are equalised).
        options: the method's keyword options (e.g. {c: 0.4} for cagrad).
        sam_rho: set it (e.g. 0.05) for the sharpness-aware multi-task step (task-based flat regions;
            level must be "params"; about 2T backward passes per step); None: off.
    """

    method: str | None = None
    level: Literal["features", "params", "fuller"] = "features"
    options: dict[str, Any] = field(default_factory=dict)
    sam_rho: float | None = None

    def validate(self) -> None:
        from mtvision.optim.calibrator import METHODS

        valid = list(METHODS)
        if self.method is not None and self.method not in valid:
            hint = closest(self.method, valid)
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"optim.calibration.method {self.method!r} is unknown{extra} (valid: {', '.join(valid)})")
        if self.sam_rho is not None:
            _check(self.sam_rho > 0, f"optim.calibration.sam_rho must be > 0 or null, got {self.sam_rho}")
            _check(self.method not in (None, "graddrop"), "optim.calibration.sam_rho needs a Gramian method (e.g. method: ew or mgda)")
            _check(self.level == "params", f"optim.calibration.sam_rho needs level: params, got {self.level!r}")
        from mtvision.optim.tracked import TRACKED

        _check(
            self.method not in TRACKED or self.level == "params",
            f"optim.calibration.method {self.method!r} tracks per-task gradients across steps and needs level: params, "
            f"got {self.level!r}",
        )


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and loss weights.

    Attributes:
        optimizer: "adamw", "adam" or "sgd".
        lr: peak learning rate (after warmup).
        weight_decay: weight decay (decoupled for adamw).
        momentum: SGD momentum (sgd only).
        betas: Adam/AdamW (beta1, beta2).
        schedule: "poly" ((1 - t)^poly_power), "cosine" or "constant", over the whole run; or "step":
            the learning rate multiplied by `step_gamma` at the start of each epoch in `step_epochs`
            (torch's StepLR / MultiStepLR stepped per epoch, as MTAN's NYUv2 recipe: [100], 0.5).
        poly_power: exponent of the poly schedule.
        step_epochs: the epochs (0-based) at whose start the "step" schedule multiplies by step_gamma.
        step_gamma: the "step" schedule's factor.
        warmup_iters: linear warmup length in optimizer steps (0: none).
        warmup_ratio: learning rate at the start of warmup, as a fraction of lr.
        min_lr: floor of the decayed learning rate.
        grad_clip: maximum global gradient norm, or None for no clipping.
        decay_norm_and_bias: weight-decay the 1-D parameters too (biases, norm weights, SSM D's):
            every model parameter in one decayed group, as the MTMamba releases; False: 1-D
            parameters without weight decay.
        loss_weights: fixed per-task loss multipliers (tasks not listed get 1.0), applied before
            the weighting method.
        task_losses: per task, a variant of its loss from `mtvision.tasks.LOSS_VARIANTS` (normals:
            "cosine", the default 1 - cos; "l1", the InvPT-family releases' L1 of the unit
            prediction summed over components; "l1_mean", the PAD-Net / MTI-Net releases' mean over
            components).
        weighting: the loss-weighting method (default EW).
        calibration: the gradient-calibration method (default none).
    """

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["poly", "cosine", "constant", "step"] = "poly"
    poly_power: float = 0.9
    step_epochs: list[int] = field(default_factory=list)
    step_gamma: float = 0.1
    warmup_iters: int = 0
    warmup_ratio: float = 1e-3
    min_lr: float = 0.0
    grad_clip: float | None = None
    decay_norm_and_bias: bool = False
    loss_weights: dict[str, float] = field(default_factory=dict)
    task_losses: dict[str, str] = field(default_factory=dict)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values."""
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.schedule != "step" or bool(self.step_epochs), "optim.schedule: step needs optim.step_epochs (e.g. [100])")
        _check(all(int(e) == e and e > 0 for e in self.step_epochs), f"optim.step_epochs must be positive integers, got {self.step_epochs}")
        _check(0 < self.step_gamma, f"optim.step_gamma must be > 0, got {self.step_gamma}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas must be in [0, 1), got {self.betas}")
        _check(self.poly_power > 0, f"optim.poly_power must be > 0, got {self.poly_power}")
        _check(self.warmup_iters >= 0, f"optim.warmup_iters must be >= 0, got {self.warmup_iters}")
        _check(0 < self.warmup_ratio <= 1, f"optim.warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, lr], got {self.min_lr}")
        _check(
            self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {self.grad_clip}"
        )
        bad = {k: v for k, v in self.loss_weights.items() if v < 0}
        _check(not bad, f"optim.loss_weights must be >= 0, got {bad}")
        self.weighting.validate()
        self.calibration.validate()


@dataclass
class TrainConfig:
    """Length of the run and how each step is executed.

    Attributes:
        epochs: run length in epochs (set exactly one of epochs and iterations).
        iterations: run length in optimizer steps (set exactly one of epochs and iterations).
        batch_size: samples per process per forward pass.
        grad_accum: forward/backward passes per optimizer step.
        eval_interval: optimizer steps between validation runs (validation also runs at the end).
        amp: mixed precision: "none", "bf16" or "fp16" (fp16 uses a GradScaler).
        compile: wrap the model with torch.compile.
        channels_last: channels-last memory format for model and images.
        seed: seed of the model initialisation and training randomness.
        deterministic: deterministic algorithms (slower; reproducible on one machine).
        sync_bn: convert BatchNorm to SyncBatchNorm under DDP.
        select: which weights the final report and the pretrained folder use: "best" (the best
            validation checkpoint by select_metric) or "last" (the final iteration, as the releases
            of InvPT, TaskPrompter and MTMamba report).
        select_metric: validation metric that picks the best checkpoint: "delta_m" (Δm% over each
            task's primary metric) or "<task>.<metric>" such as "semseg.mIoU".
        references: JSON file of single-task results {task: {metric: value}} that Δm% compares
            with; None: Δm% is taken against the run's first validation (fine for selection, not
            for reporting).
        keep_last: newest checkpoints kept on disk (the best is always kept as well).
        max_nonfinite_steps: consecutive steps with a non-finite loss after which training stops.
    """

    epochs: int | None = None
    iterations: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    eval_interval: int = 1000
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False
    sync_bn: bool = False
    select: Literal["best", "last"] = "best"
    select_metric: str = "delta_m"
    references: str | None = None
    keep_last: int = 3
    max_nonfinite_steps: int = 10

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values or when not exactly one of epochs/iterations is set."""
        _check(
            (self.epochs is None) != (self.iterations is None),
            f"set exactly one of train.epochs and train.iterations (got epochs={self.epochs}, iterations={self.iterations})",
        )
        length = self.epochs if self.epochs is not None else self.iterations
        _check(length is not None and length >= 1, f"train.epochs/iterations must be >= 1, got {length}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.eval_interval >= 1, f"train.eval_interval must be >= 1, got {self.eval_interval}")
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _check(self.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        _check(bool(self.select_metric), "train.select_metric must not be empty")


@dataclass
class LoggingConfig:
    """Console, Weights & Biases and TensorBoard logging.

    Attributes:
        console: "auto" (tqdm on a terminal, plain lines otherwise), "tqdm" or "plain".
        log_interval: optimizer steps between logged training metrics.
        wandb: log to Weights & Biases (rank 0 only); a resumed run continues the same W&B run.
        tensorboard: also write TensorBoard event files (scalars, prediction pictures, hparams) to
            <output_dir>/tensorboard (rank 0 only; needs the tensorboard package).
        wandb_project: W&B project name.
        wandb_entity: W&B team or user (None: the default entity).
        wandb_run_name: W&B run name (None: W&B chooses).
        wandb_tags: W&B run tags.
        num_val_images: validation images logged as pictures at each evaluation.
    """

    console: Literal["auto", "tqdm", "plain"] = "auto"
    log_interval: int = 20
    wandb: bool = False
    tensorboard: bool = False
    wandb_project: str = "mtvision"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    num_val_images: int = 4

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values."""
        _check(self.log_interval >= 1, f"logging.log_interval must be >= 1, got {self.log_interval}")
        _check(self.num_val_images >= 0, f"logging.num_val_images must be >= 0, got {self.num_val_images}")
        _check(
            not self.wandb or bool(self.wandb_project), "logging.wandb_project is required when logging.wandb is true"
        )


@dataclass
class ExperimentConfig:
    """One training run: data, optimisation, training loop, logging, output folder and model.

    Attributes:
        data: dataset, tasks and augmentation.
        optim: optimizer, schedule and loss weights.
        train: run length and step execution.
        logging: console and W&B logging.
        output_dir: folder for checkpoints, logs and the resolved config.
        model: the model (`mtvision.models.config.ModelConfig`); its tasks default to data.tasks with
            the dataset's class counts, its preprocess.input_size to the training size.
    """

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        """Validate every section and the rules that cross sections."""
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.logging.validate()
        _check(bool(self.output_dir), "output_dir must not be empty")
        if self.train.select == "best":
            _check(
                self.data.val_split is not None or self.data.holdout_fraction > 0,
                "train.select 'best' needs a validation split (data.val_split or data.holdout_fraction); "
                "with none, use train.select=last",
            )
        model = self.model.resolved(self.data.tasks, {}, (self.data.height, self.data.width))
        if list(model.tasks) != list(self.data.tasks):
            raise ConfigError(f"model.tasks {list(model.tasks)} must match data.tasks {self.data.tasks}")
        try:
            model.validate()
        except ConfigError as exc:
            raise ConfigError(f"model: {exc}") from exc
        for task in self.optim.loss_weights:
            if task not in self.data.tasks:
                hint = closest(task, self.data.tasks)
                extra = f"; did you mean {hint!r}?" if hint else ""
                raise ConfigError(f"optim.loss_weights names task {task!r}, which is not in data.tasks{extra}")
        for task, variant in self.optim.task_losses.items():
            if task not in self.data.tasks:
                hint = closest(task, self.data.tasks)
                extra = f"; did you mean {hint!r}?" if hint else ""
                raise ConfigError(f"optim.task_losses names task {task!r}, which is not in data.tasks{extra}")
            try:
                with_loss(get_task(task), variant)
            except (ValueError, UnknownNameError) as exc:
                raise ConfigError(f"optim.task_losses: {exc}") from exc
