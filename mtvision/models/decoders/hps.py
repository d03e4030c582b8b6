"""Hard parameter sharing: one backbone and neck for all tasks, one small head per task."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtvision.models.decoders.base import BackboneFactory, ModelOutput, MultiTaskDecoder, graph_boundary, model_output
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.tasks import Task


class HPSDecoder(MultiTaskDecoder):
    """Shared backbone + FPN neck, per-task heads (the standard multi-task baseline; with one task,
    the single-task baseline).

    Shared representation: the fused neck map, the single tensor every task's head reads; branch
    points: the per-scale backbone features.  `forward(images, [t])` runs the backbone, the neck
    and head t only.

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

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        features = graph_boundary(self.backbone(images))
        (shared,) = graph_boundary([self.neck(features)])
        return model_output({t: self.heads[t](shared) for t in tasks}, shared=[shared], branches=features)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()
