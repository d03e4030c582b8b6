"""Cross-stitch networks (Misra et al., CVPR 2016): soft parameter sharing between task columns.

Each task gets its own backbone column.  At every stage boundary (each backbone output level) a
cross-stitch unit replaces column t's activation by a learned linear combination of all columns'
activations, x~_t = sum_s alpha_ts * x_s, and the mixed activations continue into the next stage.
Column t's mixed features (all levels) feed task t's own neck and head.  alpha is initialised to
alpha_self on the diagonal and (1 - alpha_self) / (T - 1) elsewhere (the paper's (0.9, 0.1) for
two tasks); the paper trains alpha with a larger learning rate, see `cross_stitch_parameters`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, model_output
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.tasks import Task


class CrossStitchUnit(nn.Module):
    """Learned mixing of T same-shaped activations; one alpha per column pair, or per channel too."""

    def __init__(self, num_columns: int, channels: int, alpha_self: float = 0.9, channel_wise: bool = False):
        super().__init__()
        if not 0.0 <= alpha_self <= 1.0:
            raise ValueError(f"alpha_self must be in [0, 1], got {alpha_self}")
        t = num_columns
        off = (1.0 - alpha_self) / (t - 1) if t > 1 else 0.0
        alpha = torch.full((t, t), off)
        alpha.fill_diagonal_(alpha_self if t > 1 else 1.0)
        if channel_wise:
            alpha = alpha[..., None].repeat(1, 1, channels)
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Sequence[Tensor], channel_dim: int = 1, rows: Sequence[int] | None = None) -> list[Tensor]:
        """Mixed activations for columns `rows` (all by default); channels lie on `channel_dim`."""
        stacked = torch.stack(list(xs), 0)
        rows = range(len(xs)) if rows is None else rows
        out = []
        for r in rows:
            w = self.alpha[r]
            shape = [w.shape[0]] + [1] * (stacked.ndim - 1)
            if w.ndim == 2:
                shape[1 + channel_dim % (stacked.ndim - 1)] = w.shape[1]
            out.append((w.reshape(shape).to(stacked.dtype) * stacked).sum(0))
        return out


class CrossStitchDecoder(MultiTaskDecoder):
    """One backbone column per task joined by cross-stitch units at every stage boundary.

    Shared representation: none.  No single tensor carries every task's loss without also feeding
    another path (each level's mixed features feed both the next stage and a task neck), so
    the output's `shared` is empty and gradient calibration must work on parameters.  Shared
    parameters are all columns and cross-stitch units (every task's loss reaches them through the
    mixing); task parameters are the task's neck and head.  `forward(images, [t])` still runs all
    columns (the mixing needs them) but only task t's row of the last unit, neck and head.

    Options:
        neck_channels, head_channels, norm: as for HPS.
        alpha_self: initial weight of a column's own activation.
        channel_wise: one alpha per channel instead of per column pair.
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        neck_channels: int = 128,
        head_channels: int = 64,
        alpha_self: float = 0.9,
        channel_wise: bool = False,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        self.task_names = list(tasks)
        self.columns = nn.ModuleList(make_backbone() for _ in self.task_names)
        first = self.columns[0]
        first.prepare_stages()  # fails early for backbones that cannot be run stage by stage
        t = len(self.task_names)
        self.stitches = nn.ModuleList(CrossStitchUnit(t, c, alpha_self, channel_wise) for c in first.channels)
        self.necks = nn.ModuleDict({n: MultiScaleNeck(first.channels, first.strides, neck_channels, norm=norm) for n in tasks})
        self.heads = nn.ModuleDict(
            {n: TaskHead(neck_channels, s.out_channels, head_channels, norm=norm) for n, s in tasks.items()}
        )
        self.output_stride = min(first.strides)

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        cols = list(self.columns)
        channel_dim = cols[0].state_channel_dim
        wanted = [self.task_names.index(t) for t in tasks]
        states = [col.begin(images) for col in cols]
        features: dict[str, list[Tensor]] = {t: [] for t in tasks}
        last = len(self.stitches) - 1
        for k, stitch in enumerate(self.stitches):
            states = [col.run_stage(k, s) for col, s in zip(cols, states)]
            if k < last:
                states = stitch(states, channel_dim)
                mixed = [states[i] for i in wanted]
            else:
                mixed = stitch(states, channel_dim, rows=wanted)
            for t, m in zip(tasks, mixed):
                features[t].append(cols[0].stage_feature(m, size))
        return model_output({t: self.heads[t](self.necks[t](features[t])) for t in tasks})

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.necks[task].parameters()
        yield from self.heads[task].parameters()

    def cross_stitch_parameters(self) -> Iterator[nn.Parameter]:
        """The alpha parameters (the paper trains them with a much larger learning rate)."""
        return (s.alpha for s in self.stitches)
