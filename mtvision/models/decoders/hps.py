"""Hard parameter sharing: one backbone and neck for all tasks, one small head per task."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, MultiTaskDecoder
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.tasks import Task


class HPSDecoder(MultiTaskDecoder):
    """Shared backbone + FPN neck, per-task heads (the standard multi-task baseline; with one task,
    the single-task baseline).

    Shared representation: the fused neck map of the last forward, the single tensor every task's
    head reads; branch representation: the per-scale backbone features.  `forward(images, [t])` runs the backbone, the neck and head t only.

    Options:
        neck_channels: channels of the fused neck map.
        head_channels: hidden channels of each task head.
        norm: normalisation in the neck and heads: "bn" (batch norm) or "gn" (group norm).
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        neck_channels: int = 128,
        head_channels: int = 64,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        self.backbone = make_backbone()
        self.neck = MultiScaleNeck(self.backbone.channels, self.backbone.strides, neck_channels, norm=norm)
        self.heads = nn.ModuleDict(
            {n: TaskHead(neck_channels, t.out_channels, head_channels, norm=norm) for n, t in tasks.items()}
        )
        self.output_stride = self.neck.stride
        self._shared: list[Tensor] = []
        self._branches: list[Tensor] = []

    def forward(self, images: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        features = self.backbone(images)
        shared = self.neck(features)
        self._shared, self._branches = [shared], list(features)
        return {t: self.heads[t](shared) for t in tasks}

    def shared_representation(self) -> list[Tensor]:
        return list(self._shared)

    def branch_representation(self) -> list[Tensor]:
        """The per-scale backbone features of the last forward (the neck's inputs)."""
        return list(self._branches)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()
