"""Controllable multi-task architecture: a slimmable shared encoder and slimmable per-task decoders
(Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023).

One trained model holds every sub-network of a grid of width multipliers: an encoder width and one
decoder width per task (a `WidthConfig`).  At inference a `WidthConfig` picked from a compute
budget and a task preference (`mtvision/search/controllable.py`) runs through `use_config`, with
no retraining; a task's decoder width sets its share of the capacity, the encoder width most of
the total cost.

Training (train mode, no `use_config` around the forward) follows the sandwich rule of slimmable
training: every forward runs the widest configuration, the narrowest one and `num_random`
configurations drawn uniformly from the grid (encoder and each decoder independently).  The
widest configuration's predictions are `predictions`; the others' are `deep_supervision`, so the
objective adds each task's loss on every sampled sub-network to that task's loss.  The
configuration-invariant knowledge-distillation loss (CI-KD) is the regularizer `CI_KD`:

    L_CIKD = kd_weight · Σ_{a sampled, a ≠ widest} 1/|L| Σ_{l ∈ L} mean((F_l(a) − sg(F_l(widest))[:c_l(a)])²)

where F_l(a) are the encoder's output features of level l under configuration a, c_l(a) their
channels and sg stops the gradient: the widest encoder teaches every narrower one to produce the
same features on the channels it keeps.  `kd_levels` picks L: every level the decoders read
("all") or the deepest one ("last").

The paper's text past its abstract could not be read and no code of it was found: that the widest
encoder teaches the narrower ones and that encoder and decoders are slimmed independently is the
paper's; the sandwich sampling, the width grid, the switchable batch norms, the distance (mean
squared error on the kept channels) and its weight are mtvision's choices.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.models.slimmable import (
    SlimmableError,
    SwitchableBatchNorm2d,
    check_widths,
    current_widths,
    make_slimmable,
    use_widths,
)
from mtvision.tasks import Task

CI_KD = "ci_kd"
"""Regularizer name: the configuration-invariant knowledge-distillation loss."""
ENCODER = "encoder"
"""Width key of the shared encoder's slimmable layers."""
KD_LEVELS = ("all", "last")


def decoder_key(task: str) -> str:
    """Width key of task `task`'s decoder layers."""
    return f"decoder/{task}"


@dataclass(frozen=True)
class WidthConfig:
    """A sub-network: the encoder's width multiplier and each task's decoder width multiplier."""

    encoder: float
    decoders: Mapping[str, float] = field(default_factory=dict)

    def widths(self) -> dict[str, float]:
        """The `use_widths` mapping of this configuration."""
        return {ENCODER: float(self.encoder), **{decoder_key(t): float(w) for t, w in self.decoders.items()}}

    def to_dict(self) -> dict[str, object]:
        return {"encoder": float(self.encoder), "decoders": {t: float(w) for t, w in self.decoders.items()}}

    def describe(self) -> str:
        """'encoder x0.75, semseg x1, depth x0.5'."""
        parts = [f"encoder x{self.encoder:g}"] + [f"{t} x{w:g}" for t, w in self.decoders.items()]
        return ", ".join(parts)


def ci_kd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Mean over levels of the mean squared difference between each student level and the first
    channels of the (detached) teacher level of the same resolution."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"CI-KD needs the same non-zero number of levels, got {len(student)} and {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:] or s.shape[1] > t.shape[1]:
            raise ValueError(f"student level {tuple(s.shape)} does not fit teacher level {tuple(t.shape)}")
        terms.append((s.float() - t[:, : s.shape[1]].detach().float()).pow(2).mean())
    return torch.stack(terms).mean()


@contextlib.contextmanager
def use_config(config: WidthConfig) -> Iterator[None]:
    """Run controllable models inside as the sub-network `config`."""
    with use_widths(config.widths()):
        yield


class TaskDecoder(nn.Module):
    """A task's slimmable decoder: an FPN neck over the encoder levels and a prediction head, whose
    hidden channels follow the task's decoder width (the prediction layer keeps the task's channels)."""

    def __init__(self, task: str, in_channels: Sequence[int], strides: Sequence[int], out_channels: int,
                 widths: Sequence[float], neck_channels: int, head_channels: int):
        super().__init__()
        self.neck = MultiScaleNeck(in_channels, strides, neck_channels, norm="bn")
        self.head = TaskHead(neck_channels, out_channels, head_channels, norm="bn")
        make_slimmable(self, decoder_key(task), widths, condition=ENCODER, keep_out=[self.head.out])

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.head(self.neck(features))


class ControllableDecoder(MultiTaskDecoder):
    """Slimmable shared encoder + slimmable per-task decoders, trained with the sandwich rule and
    CI-KD (see the module docstring).

    Shared representation and branch points (one configuration): the encoder's feature levels.  The
    training forward runs several encoders, so it reports none (use a loss weighting, not feature-
    level gradient calibration).  `forward(images, [t])` runs the encoder and decoder t only.

    Options:
        widths: the width multipliers every encoder and decoder can take (ascending, ending at 1.0).
        neck_channels, head_channels: each task decoder's channels at width 1.0.
        num_random: configurations drawn at random per training forward, besides the widest and
            the narrowest (the sandwich rule).
        kd_weight: weight of the CI-KD loss (0 turns it off).
        kd_levels: encoder levels CI-KD compares: "all" or "last".
        calibrate_batches: when training ends, every sub-network's batch-norm statistics are
            recomputed on this many training batches without augmentation (`recalibrate_all`), so
            that the saved model serves any budget with statistics of its own (0: keep the
            statistics training left).

    A grid below 1.0 (e.g. `widths: [0.5]`, with `num_random: 0`) trains that one slim network
    alone: the separately trained baseline a sub-network of the same widths is compared with.
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        neck_channels: int = 64,
        head_channels: int = 64,
        num_random: int = 2,
        kd_weight: float = 1.0,
        kd_levels: str = "all",
        calibrate_batches: int = 20,
    ):
        super().__init__(tasks)
        self.widths = check_widths(widths)
        if num_random < 0:
            raise SlimmableError(f"num_random must be >= 0, got {num_random}")
        if kd_levels not in KD_LEVELS:
            raise SlimmableError(f"unknown kd_levels {kd_levels!r} (valid: {', '.join(KD_LEVELS)})")
        if not (kd_weight >= 0 and math.isfinite(kd_weight)):
            raise SlimmableError(f"kd_weight must be a finite number >= 0, got {kd_weight}")
        if isinstance(calibrate_batches, bool) or not isinstance(calibrate_batches, int) or calibrate_batches < 0:
            raise SlimmableError(f"calibrate_batches must be an integer >= 0, got {calibrate_batches!r}")
        self.num_random, self.kd_weight, self.kd_levels = int(num_random), float(kd_weight), kd_levels
        self.calibrate_batches = calibrate_batches
        self.backbone = make_backbone()
        if len(self.backbone.output_norms):
            raise SlimmableError("the controllable decoder needs backbone.output_norm: none (LayerNorms cannot be slimmed)")
        make_slimmable(self.backbone, ENCODER, self.widths)
        self.decoders = nn.ModuleDict({
            n: TaskDecoder(n, self.backbone.channels, self.backbone.strides, t.out_channels, self.widths,
                           neck_channels, head_channels)
            for n, t in tasks.items()
        })
        self.output_stride = min(self.backbone.strides)

    # ------------------------------------------------------------------ configurations
    def widest(self) -> WidthConfig:
        return WidthConfig(self.widths[-1], {t: self.widths[-1] for t in self.tasks})

    def narrowest(self) -> WidthConfig:
        return WidthConfig(self.widths[0], {t: self.widths[0] for t in self.tasks})

    def check_config(self, config: WidthConfig) -> WidthConfig:
        """`config` with every task present (a SlimmableError for widths off the grid or unknown tasks)."""
        unknown = [t for t in config.decoders if t not in self.tasks]
        if unknown:
            raise SlimmableError(f"width configuration names tasks {unknown} that the model does not have ({list(self.tasks)})")
        for key, w in config.widths().items():
            if not any(abs(w - g) < 1e-9 for g in self.widths):
                raise SlimmableError(f"width {w:g} for {key!r} is not on the model's grid ({', '.join(f'{g:g}' for g in self.widths)})")
        missing = {t: self.widths[-1] for t in self.tasks if t not in config.decoders}
        return WidthConfig(float(config.encoder), {**{t: float(w) for t, w in config.decoders.items()}, **missing})

    def sample_configs(self, tasks: Sequence[str], generator: torch.Generator | None = None) -> list[WidthConfig]:
        """The sandwich rule's configurations of one training forward: widest, narrowest (unless the
        grid has one width), then `num_random` drawn uniformly (torch's generator, so seeded runs
        repeat)."""
        n = len(self.widths)
        configs = [self.widest(), self.narrowest()] if n > 1 else [self.widest()]
        for _ in range(self.num_random):
            draw = torch.randint(n, (1 + len(tasks),), generator=generator).tolist()
            configs.append(WidthConfig(self.widths[draw[0]], {t: self.widths[i] for t, i in zip(tasks, draw[1:])}))
        return configs

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        widths = current_widths()
        if widths is None and self.training:
            return self._sandwich(images, tasks)
        config = self.widest() if widths is None else self._config_from(widths)
        return self.forward_config(images, tasks, config)

    def _config_from(self, widths: Mapping[str, float]) -> WidthConfig:
        prefix = decoder_key("")
        decoders = {k[len(prefix):]: w for k, w in widths.items() if k.startswith(prefix) and k[len(prefix):] in self.tasks}
        return self.check_config(WidthConfig(widths.get(ENCODER, self.widths[-1]), decoders))

    def _features(self, images: Tensor) -> list[Tensor]:
        return self.backbone(images)

    def forward_config(self, images: Tensor, tasks: Sequence[str], config: WidthConfig) -> ModelOutput:
        """The outputs of `tasks` from the sub-network `config`."""
        config = self.check_config(config)
        with use_config(config):
            features = graph_boundary(self._features(images))
            predictions = {t: self.decoders[t](features) for t in tasks}
        return model_output(predictions, shared=features, branches=features)

    def _sandwich(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        configs = self.sample_configs(tasks)
        with use_config(configs[0]):
            teacher = self._features(images)
            predictions = {t: self.decoders[t](teacher) for t in tasks}
        deep: dict[str, list[Tensor]] = {t: [] for t in tasks}
        distill = []
        for config in configs[1:]:
            with use_config(config):
                features = self._features(images)
                for t in tasks:
                    deep[t].append(self.decoders[t](features))
            if config.encoder != configs[0].encoder:
                pick = slice(None) if self.kd_levels == "all" else slice(-1, None)
                distill.append(ci_kd_loss(features[pick], teacher[pick]))
        kd = torch.stack(distill).sum() if distill else images.new_zeros(())
        kd = self.kd_weight * kd + self._untouched(configs, tasks)
        return model_output(predictions, deep_supervision=deep, regularizers={CI_KD: kd})

    def _untouched(self, configs: Sequence[WidthConfig], tasks: Sequence[str]) -> Tensor | float:
        """Under DDP, zero times the batch norms no sampled configuration used, so that every rank's
        reducer sees a gradient for every parameter (each rank draws its own configurations)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 0.0
        used = {id(bn) for c in configs for bn in self.batch_norms(c, tasks)}
        extra = [p.sum() for m in self.modules() if isinstance(m, SwitchableBatchNorm2d)
                 for bn in m.copies.values() if id(bn) not in used for p in bn.parameters()]
        return 0.0 * torch.stack(extra).sum() if extra else 0.0

    def batch_norms(self, config: WidthConfig, tasks: Sequence[str]) -> list[nn.BatchNorm2d]:
        """The batch-norm copies the sub-network `config` runs for `tasks` (the encoder's and those
        tasks' decoders')."""
        keys = {ENCODER, *(decoder_key(t) for t in tasks)}
        with use_config(config):
            return [m.active() for m in self.modules() if isinstance(m, SwitchableBatchNorm2d) and m.key in keys]

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.decoders[task].parameters()

    def finish_training(self, images: Iterable[Tensor]) -> str | None:
        if self.calibrate_batches == 0:
            return None
        batches = list(itertools.islice(images, self.calibrate_batches))
        if not batches:
            return None
        count = recalibrate_all(self, batches)
        return (f"batch norms of every sub-network ({count} (encoder width, decoder width) pairs) recalibrated on "
                f"{len(batches)} training batches")


@torch.no_grad()
def recalibrate_batch_norms(
    model: nn.Module, config: WidthConfig, batches: Iterator[Tensor] | Sequence[Tensor], tasks: Sequence[str] | None = None
) -> int:
    """Recompute the running statistics of the batch norms the sub-network `config` of a controllable
    model uses, as the plain average over `batches` (normalised image tensors, e.g. training images
    without augmentation), as slimmable networks do before a sub-network is evaluated (Yu & Huang,
    "Universally Slimmable Networks", ICCV 2019).  Only that configuration's copies change; the
    model's mode is restored.  Returns the number of batches used."""
    decoder = _controllable(model)
    config = decoder.check_config(config)
    tasks = list(decoder.tasks if tasks is None else tasks)
    norms = decoder.batch_norms(config, tasks)  # only what the forwards below update
    momenta = [bn.momentum for bn in norms]
    was_training = model.training
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    count = 0
    try:
        for images in batches:
            decoder.forward_config(images, tasks, config)
            count += 1
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)
    if count == 0:
        raise ValueError("batch-norm recalibration needs at least one batch")
    return count


def _controllable(model: nn.Module) -> ControllableDecoder:
    decoder = model if isinstance(model, ControllableDecoder) else getattr(model, "decoder", None)
    if not isinstance(decoder, ControllableDecoder):
        name = type(model).__name__ if decoder is None else type(decoder).__name__
        raise TypeError(f"batch-norm recalibration needs a controllable model, got {name}")
    return decoder


@torch.no_grad()
def recalibrate_all(model: nn.Module, batches: Sequence[Tensor]) -> int:
    """`recalibrate_batch_norms` for every sub-network of a controllable model (or its decoder) on
    the same `batches`.  A decoder's batch norms depend only on its own width and the encoder's, so
    the (encoder width, decoder width) pairs with every decoder at that width cover every copy.
    Returns the number of pairs."""
    decoder = _controllable(model)
    for e in decoder.widths:
        for d in decoder.widths:
            recalibrate_batch_norms(model, WidthConfig(e, {t: d for t in decoder.tasks}), batches)
    return len(decoder.widths) ** 2
