"""The contract every multi-task decoder (architecture) implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn

from mtvision.models.backbones import Backbone
from mtvision.tasks import Task

BackboneFactory = Callable[[], Backbone]


class MultiTaskDecoder(nn.Module):
    """Backbone(s) plus task-specific parts, mapping images to raw per-task outputs.

    A decoder is built as `Decoder(make_backbone, tasks, **options)`: `make_backbone()` returns a
    fresh `Backbone` (soft-sharing decoders call it once per column) and `tasks` maps task names to
    their `Task` records.  Subclasses implement `forward`, `task_parameters` and
    `shared_representation`; outputs may be at any resolution (the model resizes them).
    """

    def __init__(self, tasks: dict[str, Task]):
        super().__init__()
        if not tasks:
            raise ValueError("a model needs at least one task")
        self.tasks = dict(tasks)

    def forward(self, images: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        """Raw outputs of `tasks` (a subset of `self.tasks`, computing only what they need)."""
        raise NotImplementedError

    def shared_representation(self) -> list[Tensor]:
        """Tensors of the last forward that every task's loss flows through (empty when none exists)."""
        raise NotImplementedError

    def branch_representation(self) -> list[Tensor]:
        """Tensors of the last forward where the shared part splits into branches (per-scale backbone
        features feeding a neck), for FULLER-style calibration; empty when the decoder has none."""
        return []

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters that only `task`'s output depends on."""
        raise NotImplementedError

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not task-specific."""
        owned = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        return (p for p in self.parameters() if id(p) not in owned)
