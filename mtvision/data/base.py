"""The base class every mtvision dataset derives from."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from mtvision.data.camera import INTRINSICS_KEY, assumed_intrinsics
from mtvision.data.sample import to_sample, validate_raw
from mtvision.errors import DatasetError, unknown_name
from mtvision.tasks import TASKS, Task, resolve_tasks

RawTransform = Callable[[dict[str, Any]], dict[str, Any]]


class MultiTaskDataset(torch.utils.data.Dataset):
    """A dataset of raw multi-task samples, turned into tensor samples by `transform`.

    Subclasses set `available_tasks` (what can be asked for), optionally `default_tasks` (what
    `tasks=None` gives; all available tasks when unset), `num_classes` (for label tasks) and
    `boundary_tolerance`, and implement `__len__` and `load_raw(index)` returning a raw sample (see `mtvision.data.sample`).
    `transform` maps a raw sample to a tensor sample; by default `to_sample` (normalise only).
    """

    available_tasks: ClassVar[tuple[str, ...]] = ()
    default_tasks: ClassVar[tuple[str, ...] | None] = None
    num_classes: ClassVar[Mapping[str, int]] = {}
    boundary_tolerance: ClassVar[float] = 0.011
    assumed_hfov: float | None = None
    """Horizontal field of view (degrees) of the pinhole camera assumed for samples that carry no
    intrinsics of their own (`mtvision.data.camera.assumed_intrinsics`); None: none is assumed."""

    def __init__(self, tasks: Sequence[str] | None = None, transform: RawTransform | None = None) -> None:
        default = self.available_tasks if self.default_tasks is None else self.default_tasks
        self.tasks: tuple[str, ...] = tuple(tasks) if tasks is not None else tuple(default)
        for name in self.tasks:
            if name not in TASKS:
                raise unknown_name("task", name, TASKS)
            if name not in self.available_tasks:
                raise DatasetError(
                    f"{type(self).__name__} cannot provide task {name!r} (it provides: {', '.join(self.available_tasks)})"
                )
        self.transform = transform

    @classmethod
    def from_config(cls, cfg: Any, split: str, transform: RawTransform | None = None) -> MultiTaskDataset:
        """The dataset of `split` that a data config (`DataConfig`: root, tasks, ...) describes."""
        return cls(cfg.root, split=split, tasks=cfg.tasks, transform=transform)

    def __len__(self) -> int:
        raise NotImplementedError

    def load_raw(self, index: int) -> dict[str, Any]:
        """The raw numpy sample at `index` (only the requested tasks)."""
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        """A human-readable id of sample `index`, used in error messages."""
        return str(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        index = index % len(self)
        raw = self.load_raw(index)
        if self.assumed_hfov is not None and isinstance(raw.get("meta"), dict) and INTRINSICS_KEY not in raw["meta"]:
            raw["meta"][INTRINSICS_KEY] = assumed_intrinsics(raw["image"].shape[:2], self.assumed_hfov)
        validate_raw(raw, source=f"{type(self).__name__} sample {self.sample_id(index)!r}")
        return self.transform(raw) if self.transform is not None else to_sample(raw)

    def task_specs(self) -> dict[str, Task]:
        """Task records for this dataset's tasks, with its class counts."""
        return resolve_tasks(self.tasks, self.num_classes)

    def meter_info(self) -> dict[str, Any]:
        """Dataset facts the metrics need (passed to `Task.new_meter`)."""
        return {"boundary_tolerance": self.boundary_tolerance}
