"""Strict dataclass configs: YAML files with one `base:`, dotted command-line overrides, typed conversion.

`load_config(ExperimentConfig, "configs/x.yaml", ["optim.lr=1e-3"])` reads the file chain (each file may
name at most one `base:`, relative to itself; the child wins, dicts merge, lists replace), applies the
overrides (values parsed with `yaml.safe_load`), and converts the result with `from_dict`, which rejects
unknown keys (naming the closest valid dotted key), wrong types (naming the key, the expected type and the
value) and missing required fields. PyYAML reads `1e-3` as a string, so float fields accept number-shaped
strings; nothing else is coerced (a bool field refuses "yes" as a string, an int field refuses 1.5).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mtvision.atomic import atomic_write_bytes
from mtvision.errors import MTVisionError, UnknownNameError, closest

T = TypeVar("T")

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_MISSING = object()


class ConfigError(MTVisionError, ValueError):
    """A config file, override or value that is malformed, of the wrong type or inconsistent."""


class UnknownKeyError(ConfigError, UnknownNameError):
    """A config key that the target dataclass does not have."""


# ----------------------------------------------------------------------------------------------------------
# strict conversion


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))


def _wrong(where: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {where!r}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against (and converted to) the annotation `hint`; `where` is its dotted key."""
    if hint is Any or hint is object:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(where, hint, value)
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except UnknownKeyError:
                raise  # the value has the right shape; report the precise problem
            except ConfigError:
                continue
        raise _wrong(where, hint, value)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        allowed = ", ".join(repr(a) for a in args)
        hint_name = closest(str(value), [str(a) for a in args]) if isinstance(value, str) else None
        extra = f"; did you mean {hint_name!r}?" if hint_name else ""
        raise ConfigError(f"config key {where!r}: {value!r} is not one of {allowed}{extra}")
    if hint in (list, tuple, dict):
        origin, args = hint, ()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, hint, value)
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, hint, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {where!r}: expected {len(args)} items ({_type_name(hint)}), got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong(where, hint, value)
        key_type, item = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_type is str and not isinstance(k, str):
                raise ConfigError(f"config key {where!r}: keys must be strings, got {k!r} ({type(k).__name__})")
            out[k] = _convert(v, item, _join(where, k))
        return out
    if hint is bool:
        if not isinstance(value, bool):
            raise _wrong(where, hint, value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(where, hint, value)
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(where, hint, value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _wrong(where, hint, value)
        return value
    if isinstance(hint, type):
        if not isinstance(value, hint):
            raise _wrong(where, hint, value)
        return value
    raise ConfigError(f"config key {where!r}: unsupported annotation {hint!r}")


def _build(cls: type[T], data: Any, prefix: str) -> T:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix or '<root>'!r}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            hint = closest(str(key), names)
            extra = f"; did you mean {_join(prefix, hint)!r}?" if hint else ""
            raise UnknownKeyError(f"unknown key {_join(prefix, key)!r}{extra} (valid: {', '.join(names)})")
    missing = [
        _join(prefix, f.name)
        for f in fields
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(repr(m) for m in missing)}")
    kwargs = {name: _convert(data[name], hints[name], _join(prefix, name)) for name in names if name in data}
    return cls(**kwargs)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Strictly convert a plain (nested) dict into the dataclass `cls`, then call its `validate()` if any.

    `prefix` is the dotted key of `data` inside a larger config, used in error messages.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    config = _build(cls, data, prefix)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass `cfg` as plain nested dicts/lists (tuples become lists), ready for YAML or JSON."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# files and overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """`child` over `base`: dicts merge recursively, everything else (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file merged over its chain of `base:` files, as a plain dict (no `base` key)."""
    chain: list[Path] = []
    current = Path(path).resolve()
    layers: list[dict[str, Any]] = []
    while True:
        if current in chain:
            cycle = " -> ".join(str(p) for p in [*chain, current])
            raise ConfigError(f"config base cycle: {cycle}")
        if not current.is_file():
            where = f" (the base of {chain[-1]})" if chain else ""
            raise ConfigError(f"config file not found: {current}{where}")
        chain.append(current)
        data = _read_yaml(current)
        base = data.pop("base", None)
        layers.append(data)
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise ConfigError(
                f"config file {current}: 'base' must be one file name (at most one base per file), got {base!r}"
            )
        current = (current.parent / base).resolve()
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = deep_merge(merged, layer)
    return merged


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with dotted `key=value` overrides applied in order (values parsed by `yaml.safe_load`)."""
    out = deep_merge({}, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or not all(parts):
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value: {exc}") from exc
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r}: {where!r} holds {child!r}, not a mapping")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """The dataclass `cls` from a YAML file (with its `base:` chain) and dotted overrides, strictly checked."""
    data = apply_overrides(read_config_file(path), overrides)
    try:
        return from_dict(cls, data)
    except UnknownKeyError as exc:
        raise UnknownKeyError(f"{path}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically: JSON when `path` ends with .json, else YAML."""

    data = config_to_dict(cfg)
    if str(path).endswith(".json"):
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------
# run-level configs


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """What to train and evaluate on.

    Attributes:
        dataset: "synthetic" (procedural scenes, no files), "nyud" or "pascal".
        root: dataset folder (required for nyud and pascal).
        tasks: task names from `mtvision.tasks`, in output order.
        train_split: split used for training.
        val_split: held-out split used for validation and model selection (never the test split).
        test_split: split used for the final evaluation only.
        holdout_fraction: when > 0, validate on this last fraction of train_split instead of val_split
            (for NYUD and PASCAL, whose public "val" split is the reported test set).
        height: training crop height in pixels.
        width: training crop width in pixels.
        scale_range: random scale range (lo, hi) of the training augmentation.
        flip: random horizontal flips during training.
        photometric: photometric distortion of the training image.
        num_samples: synthetic dataset sizes by split name (train/val/test splits must all be listed).
        seed: seed of the synthetic scenes and of data shuffling.
        num_workers: data-loader worker processes per training process.
        pin_memory: pinned host memory for batches (worth enabling when training on CUDA).
    """

    dataset: Literal["synthetic", "nyud", "pascal"] = "synthetic"
    root: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["semseg", "depth", "normals", "edge"])
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    holdout_fraction: float = 0.0
    height: int = 128
    width: int = 160
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    photometric: bool = True
    num_samples: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 200, "test": 200})
    seed: int = 0
    num_workers: int = 2
    pin_memory: bool = False

    def validate(self) -> None:
        """Raise ConfigError (UnknownNameError for tasks) on inconsistent values."""
        from mtvision.tasks import get_task

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
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(0 <= self.holdout_fraction < 1, f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        splits = {self.train_split, self.test_split}
        if self.holdout_fraction == 0:
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
        method: "ew", "fixed", "uw", "dwa", "gradnorm", "rlw", "gls", "famo" or "igb".
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
            "gradvac", "ew") or "graddrop"; None: no calibration (one plain backward pass).
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
        from mtvision.optim.aggregators import AGGREGATORS

        valid = [*AGGREGATORS, "graddrop"]
        if self.method is not None and self.method not in valid:
            hint = closest(self.method, valid)
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"optim.calibration.method {self.method!r} is unknown{extra} (valid: {', '.join(valid)})")
        if self.sam_rho is not None:
            _check(self.sam_rho > 0, f"optim.calibration.sam_rho must be > 0 or null, got {self.sam_rho}")
            _check(self.method not in (None, "graddrop"), "optim.calibration.sam_rho needs a Gramian method (e.g. method: ew or mgda)")
            _check(self.level == "params", f"optim.calibration.sam_rho needs level: params, got {self.level!r}")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and loss weights.

    Attributes:
        optimizer: "adamw", "adam" or "sgd".
        lr: peak learning rate (after warmup).
        weight_decay: weight decay (decoupled for adamw).
        momentum: SGD momentum (sgd only).
        betas: Adam/AdamW (beta1, beta2).
        schedule: "poly" ((1 - t)^poly_power), "cosine" or "constant", over the whole run.
        poly_power: exponent of the poly schedule.
        warmup_iters: linear warmup length in optimizer steps (0: none).
        warmup_ratio: learning rate at the start of warmup, as a fraction of lr.
        min_lr: floor of the decayed learning rate.
        grad_clip: maximum global gradient norm, or None for no clipping.
        loss_weights: fixed per-task loss multipliers (tasks not listed get 1.0), applied before
            the weighting method.
        weighting: the loss-weighting method (default EW).
        calibration: the gradient-calibration method (default none).
    """

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_ratio: float = 1e-3
    min_lr: float = 0.0
    grad_clip: float | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> None:
        """Raise ConfigError on out-of-range values."""
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
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
    """Console and Weights & Biases logging.

    Attributes:
        console: "auto" (tqdm on a terminal, plain lines otherwise), "tqdm" or "plain".
        log_interval: optimizer steps between logged training metrics.
        wandb: log to Weights & Biases (rank 0 only).
        wandb_project: W&B project name.
        wandb_entity: W&B team or user (None: the default entity).
        wandb_run_name: W&B run name (None: W&B chooses).
        wandb_tags: W&B run tags.
        num_val_images: validation images logged as pictures at each evaluation.
    """

    console: Literal["auto", "tqdm", "plain"] = "auto"
    log_interval: int = 20
    wandb: bool = False
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
        model: the model section, kept as a plain dict here (parsed by the model config).
    """

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs/default"
    model: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Validate every section and the rules that cross sections."""
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.logging.validate()
        _check(bool(self.output_dir), "output_dir must not be empty")
        calibration = self.optim.calibration
        if self.train.compile and (calibration.method and calibration.level in ("features", "fuller") or self.optim.weighting.method == "gradnorm"):
            raise ConfigError(
                "train.compile cannot be combined with features/fuller calibration or GradNorm: they read the "
                "shared representation a compiled graph does not expose; use optim.calibration.level=params "
                "or train.compile=false"
            )
        for task in self.optim.loss_weights:
            if task not in self.data.tasks:
                hint = closest(task, self.data.tasks)
                extra = f"; did you mean {hint!r}?" if hint else ""
                raise ConfigError(f"optim.loss_weights names task {task!r}, which is not in data.tasks{extra}")
