"""`SearchConfig`: a strict dataclass config for `mtv-search` (same YAML machinery as training).

    output_dir: runs/search_bmtas
    data: {...}            # as in a training config (DataConfig)
    model: {...}           # backbone and decoder_options (neck_channels, head_channels, norm)
    search: {method: bmtas, epochs: 20, ...}
    recipe: {optim: {...}, train: {...}, logging: {...}, output_dir: ...}  # the training run to write

Unset method options take the method's published defaults (see `resolved`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mtvision.config import ConfigError, DataConfig, ExperimentConfig, deep_merge, from_dict
from mtvision.errors import closest


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class SearchOptions:
    """How the search runs.

    Attributes:
        method: "bmtas" (bilevel, soft Gumbel mixing, resource loss) or "ltb" (Learning to Branch:
            hard straight-through parent choices, trained jointly with the weights).
        epochs: search epochs (temperatures change once per epoch).
        iterations_per_epoch: cap on the weight (and architecture) steps per epoch; None: a full pass.
        batch_size: images per process per step.
        warmup_epochs: epochs that train the weights only (None: bmtas epochs // 20 but at least 1, ltb ⌈epochs/100⌉).
        temperature_initial: first temperature (None: bmtas 5.0, ltb epochs / 20).
        temperature_final: last temperature, bmtas only (None: 0.1; ltb decays as τ0/√(epoch+1)).
        weight_lr, weight_decay: Adam for the weights.
        arch_lr: Adam for the architecture parameters (None: bmtas 0.01, ltb weight_lr).
        arch_weight_decay: (None: bmtas 5e-5, ltb 0).
        resource_weight: λ of bmtas's resource loss, on expected GFLOPs (None: 0.05); not for ltb.
        target_flops: FLOPs budget per image of the derived tree (None: no budget).
        arch_fraction: share of the training images kept for bmtas's architecture steps.
        loss_weights: fixed per-task loss multipliers.
        seed: seed of the weights, the data order and the Gumbel noise.
        console: progress display ("auto", "tqdm", "plain").
        log_interval: steps between plain progress lines.
    """

    method: Literal["bmtas", "ltb"] = "bmtas"
    epochs: int = 20
    iterations_per_epoch: int | None = None
    batch_size: int = 8
    warmup_epochs: int | None = None
    temperature_initial: float | None = None
    temperature_final: float | None = None
    weight_lr: float = 1e-3
    weight_decay: float = 1e-4
    arch_lr: float | None = None
    arch_weight_decay: float | None = None
    resource_weight: float | None = None
    target_flops: float | None = None
    arch_fraction: float = 0.2
    loss_weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    console: Literal["auto", "tqdm", "plain"] = "auto"
    log_interval: int = 20

    def validate(self) -> None:
        _check(self.epochs >= 1, f"search.epochs must be >= 1, got {self.epochs}")
        _check(self.iterations_per_epoch is None or self.iterations_per_epoch >= 1,
               f"search.iterations_per_epoch must be >= 1 or null, got {self.iterations_per_epoch}")
        _check(self.batch_size >= 1, f"search.batch_size must be >= 1, got {self.batch_size}")
        _check(self.warmup_epochs is None or 0 <= self.warmup_epochs < self.epochs,
               f"search.warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        for name in ("temperature_initial", "temperature_final", "arch_lr"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"search.{name} must be > 0 or null, got {value}")
        _check(self.weight_lr > 0, f"search.weight_lr must be > 0, got {self.weight_lr}")
        _check(self.weight_decay >= 0, f"search.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.arch_weight_decay is None or self.arch_weight_decay >= 0,
               f"search.arch_weight_decay must be >= 0 or null, got {self.arch_weight_decay}")
        _check(self.resource_weight is None or self.resource_weight >= 0,
               f"search.resource_weight must be >= 0 or null, got {self.resource_weight}")
        _check(self.target_flops is None or self.target_flops > 0,
               f"search.target_flops must be > 0 or null (FLOPs per image), got {self.target_flops}")
        _check(0 < self.arch_fraction < 1, f"search.arch_fraction must be in (0, 1), got {self.arch_fraction}")
        _check(self.log_interval >= 1, f"search.log_interval must be >= 1, got {self.log_interval}")
        bad = {k: v for k, v in self.loss_weights.items() if v < 0}
        _check(not bad, f"search.loss_weights must be >= 0, got {bad}")
        if self.method == "ltb":
            _check(self.temperature_final is None,
                   "search.temperature_final is for bmtas; ltb's temperature decays as temperature_initial / sqrt(epoch + 1)")
            _check(self.resource_weight is None,
                   "search.resource_weight is for bmtas; ltb has no resource loss (set search.target_flops for a budget)")


@dataclass(frozen=True)
class Resolved:
    """The method options with every default filled in."""

    warmup_epochs: int
    temperature_initial: float
    temperature_final: float | None
    arch_lr: float
    arch_weight_decay: float
    resource_weight: float


def resolved(opts: SearchOptions) -> Resolved:
    """`opts` with the method's published defaults for unset values (see bmtas.py and ltb.py)."""
    if opts.method == "bmtas":
        from mtvision.search import bmtas

        d = bmtas.DEFAULTS
        return Resolved(
            warmup_epochs=bmtas.warmup_epochs(opts.epochs) if opts.warmup_epochs is None else opts.warmup_epochs,
            temperature_initial=opts.temperature_initial or d["temperature_initial"],
            temperature_final=opts.temperature_final or d["temperature_final"],
            arch_lr=opts.arch_lr or d["arch_lr"],
            arch_weight_decay=d["arch_weight_decay"] if opts.arch_weight_decay is None else opts.arch_weight_decay,
            resource_weight=d["resource_weight"] if opts.resource_weight is None else opts.resource_weight,
        )
    from mtvision.search import ltb

    warm = ltb.warmup_epochs(opts.epochs) if opts.warmup_epochs is None else opts.warmup_epochs
    return Resolved(
        warmup_epochs=min(warm, opts.epochs - 1),
        temperature_initial=opts.temperature_initial or ltb.initial_temperature(opts.epochs),
        temperature_final=None,
        arch_lr=opts.arch_lr or opts.weight_lr,
        arch_weight_decay=ltb.DEFAULTS["arch_weight_decay"] if opts.arch_weight_decay is None else opts.arch_weight_decay,
        resource_weight=0.0,
    )


RECIPE_KEYS = ("optim", "train", "logging", "output_dir")


@dataclass
class SearchConfig:
    """One branching search.

    Attributes:
        data: dataset and tasks (as for training; a validation hold-out is excluded from the search).
        model: backbone and decoder_options (neck_channels, head_channels, norm); decoder must be
            absent or "branched", and the spec is what the search finds.
        search: the search options.
        recipe: optim / train / logging / output_dir of the training config the search writes.
        output_dir: folder for the search's outputs.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    search: SearchOptions = field(default_factory=SearchOptions)
    recipe: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/search"

    def validate(self) -> None:
        self.data.validate()
        self.search.validate()
        _check(bool(self.output_dir), "output_dir must not be empty")
        decoder = self.model.get("decoder", "branched")
        _check(decoder == "branched", f"model.decoder must be 'branched' (or absent) for a search, got {decoder!r}")
        options = dict(self.model.get("decoder_options") or {})
        _check("spec" not in options, "model.decoder_options.spec is what the search finds: remove it")
        for task in self.search.loss_weights:
            if task not in self.data.tasks:
                hint = closest(task, self.data.tasks)
                extra = f"; did you mean {hint!r}?" if hint else ""
                raise ConfigError(f"search.loss_weights names task {task!r}, which is not in data.tasks{extra}")
        for key in self.recipe:
            if key not in RECIPE_KEYS:
                hint = closest(str(key), RECIPE_KEYS)
                extra = f"; did you mean 'recipe.{hint}'?" if hint else ""
                raise ConfigError(f"unknown key 'recipe.{key}'{extra} (valid: {', '.join(RECIPE_KEYS)})")
        from mtvision.models.branching_spec import BranchingSpec

        probe = BranchingSpec.all_shared(self.data.tasks, 1).to_dict()
        try:  # the recipe must make a valid training config (checked with a placeholder spec)
            self.experiment(probe)
        except ConfigError as exc:
            raise ConfigError(f"recipe: {exc}") from exc

    def model_section(self) -> dict[str, Any]:
        """The model section with decoder 'branched' (no spec)."""
        section = dict(self.model)
        section["decoder"] = "branched"
        section["decoder_options"] = dict(section.get("decoder_options") or {})
        return section

    def experiment(self, spec: dict[str, Any]) -> ExperimentConfig:
        """The training config of the tree `spec` (a spec dict): this data and model, the recipe."""
        from mtvision.config import config_to_dict

        model = self.model_section()
        model["decoder_options"] = {**model["decoder_options"], "spec": spec}
        recipe = dict(self.recipe)
        recipe.setdefault("output_dir", f"{self.output_dir.rstrip('/')}/train")
        raw = deep_merge({"data": config_to_dict(self.data), "model": model}, recipe)
        if self.search.loss_weights:
            raw.setdefault("optim", {})
            raw["optim"] = {**raw["optim"], "loss_weights": {**self.search.loss_weights, **raw["optim"].get("loss_weights", {})}}
        raw.setdefault("train", {})
        if "epochs" not in raw["train"] and "iterations" not in raw["train"]:
            raw["train"] = {**raw["train"], "iterations": 1000}
        return from_dict(ExperimentConfig, raw)


def with_search(cfg: SearchConfig, **changes: Any) -> SearchConfig:
    """A copy of `cfg` with search options changed (for tests and tools)."""
    return replace(cfg, search=replace(cfg.search, **changes))


__all__ = ["Resolved", "SearchConfig", "SearchOptions", "resolved", "with_search"]
