"""TAPS: one backbone whose Conv2d / Linear layers carry per-task gated weight deltas
(`mtvision.models.task_adaptive`), with a neck and head per task."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtvision.models import task_adaptive as taps
from mtvision.models.decoders.base import TAPS_SPARSITY, BackboneFactory, ModelOutput, MultiTaskDecoder, model_output
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.tasks import Task


class TAPSTaskNetwork(nn.Module):
    """A plain single-task network exported from TAPS: images -> the task's raw output."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.neck(self.backbone(images)))


class TAPSDecoder(MultiTaskDecoder):
    """Task Adaptive Parameter Sharing (Wallingford et al., CVPR 2022) on any timm backbone.

    Every Conv2d / Linear of the backbone runs W + I(s_{t,l} ≥ τ)·ΔW_{t,l} for task t (straight-through
    gate, ΔW zero-initialised); each task has its own FPN neck and head (its features differ).
    `forward(images, tasks)` runs the backbone once per requested task, so a single task costs one
    pass.  In training the output carries the regularizer `TAPS_SPARSITY`: the sparsity penalty
    λ Σ_t (1/L) Σ_l |s_{t,l}| over the requested tasks, which the trainer adds outside the task
    weighting.  `adapted_layers()` reports the layers each task adapted, `state_scalars()` their
    statistics.

    Shared representation: none, since no tensor is shared by all tasks (every task runs its own
    backbone pass); feature-level calibration needs `level: params`.  Task parameters: t's deltas
    and scores, neck and head.

    Options:
        sparsity: λ, the weight of the sparsity penalty (authors' default 1.0).
        threshold: τ, the gate threshold (0.1).
        score_init: the scores' initial value (0.15: every gate starts open, with zero deltas).
        freeze_shared: keep the backbone's Conv2d / Linear weights W fixed and train only the deltas
            (the paper's setting, for a pretrained backbone); normalisation layers stay shared and trainable.
        penalty: "layers" (1/L per layer, the authors' code) or "params" (by each layer's share of the weights).
        penalty_warmup: training forward passes without the penalty (the authors skip it for 2 of 30 epochs).
        neck_channels, head_channels, norm: as for HPS.
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        sparsity: float = 1.0,
        threshold: float = taps.THRESHOLD,
        score_init: float = taps.SCORE_INIT,
        freeze_shared: bool = True,
        penalty: str = "layers",
        penalty_warmup: int = 0,
        neck_channels: int = 128,
        head_channels: int = 64,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        if penalty not in taps.PENALTY_NORMALISATIONS:
            raise ValueError(f"unknown TAPS penalty {penalty!r} (valid: {', '.join(taps.PENALTY_NORMALISATIONS)})")
        if sparsity < 0 or penalty_warmup < 0:
            raise ValueError("TAPS sparsity and penalty_warmup must be non-negative")
        self.sparsity, self.penalty, self.penalty_warmup = float(sparsity), penalty, int(penalty_warmup)
        self.backbone = make_backbone()
        if getattr(self.backbone, "grad_checkpointing", False):
            raise ValueError(
                "TAPS does not support backbone.grad_checkpointing: the backward pass would recompute the "
                "backbone with whichever task's weights are active then, not the task that ran"
            )
        self.layer_names = taps.make_task_adaptive(
            self.backbone, list(tasks), threshold=threshold, score_init=score_init, freeze_shared=freeze_shared
        )
        for attr in ("_plan", "_to_map"):  # staged-forward plans built earlier would hold the old layers
            if hasattr(self.backbone, attr):
                setattr(self.backbone, attr, None)
        channels, strides = self.backbone.channels, self.backbone.strides
        self.necks = nn.ModuleDict({t: MultiScaleNeck(channels, strides, neck_channels, norm=norm) for t in tasks})
        self.heads = nn.ModuleDict(
            {n: TaskHead(neck_channels, t.out_channels, head_channels, norm=norm) for n, t in tasks.items()}
        )
        self.output_stride = min(strides)
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long))

    def task_features(self, images: Tensor, task: str | None) -> list[Tensor]:
        """Task `task`'s multi-scale backbone features (None: the shared network's)."""
        with taps.active_task(self.backbone, task):
            return self.backbone(images)

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        out: dict[str, Tensor] = {}
        regularizers: dict[str, Tensor] = {}
        for t in tasks:
            if t not in self.tasks:
                raise KeyError(f"unknown task {t!r} (model tasks: {', '.join(self.tasks)})")
            out[t] = self.heads[t](self.necks[t](self.task_features(images, t)))
        if self.training and torch.is_grad_enabled():
            self.training_forwards += 1
            warm = self.penalty_warmup == 0 or int(self.training_forwards) > self.penalty_warmup  # (a sync only then)
            if self.sparsity > 0 and warm:
                regularizers[TAPS_SPARSITY] = self.sparsity_penalty(tasks)
        return model_output(out, regularizers=regularizers)

    def sparsity_penalty(self, tasks: Sequence[str] | None = None) -> Tensor:
        """λ Σ_t Σ_l c_l |s_{t,l}| over `tasks` (all by default)."""
        return taps.sparsity_penalty(self.backbone, tasks, self.sparsity, self.penalty)

    def adapted_layers(self) -> dict[str, list[str]]:
        """Per task, the backbone layers whose gate is open (the layers it adapted)."""
        return taps.adapted_layers(self.backbone, list(self.tasks))

    def state_scalars(self) -> dict[str, float]:
        """Adaptation statistics for the loggers: `taps/<task>/{open_layers, open_fraction,
        param_fraction, mean_score}` (param_fraction: the task-specific share of the backbone's
        adaptable weights)."""
        stats = taps.adaptation_stats(self.backbone)
        return {f"taps/{t}/{k}": v for t, values in stats.items() for k, v in values.items()}

    def export(self, task: str) -> TAPSTaskNetwork:
        """A plain copy of task's network (merged weights, its neck and head), images -> raw output."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r} (model tasks: {', '.join(self.tasks)})")
        return TAPSTaskNetwork(
            taps.merge_task(self.backbone, task), copy.deepcopy(self.necks[task]), copy.deepcopy(self.heads[task])
        )

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r} (model tasks: {', '.join(self.tasks)})")
        for layer in taps.taps_layers(self.backbone):
            yield layer.deltas[task]
            yield layer.scores[task]
        yield from self.necks[task].parameters()
        yield from self.heads[task].parameters()
