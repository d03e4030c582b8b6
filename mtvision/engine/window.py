"""The logging window: what the training steps between two log lines add up to.

Each step's `StepRecord` holds device tensors (losses, regularizers, model statistics); the window
sums them as tensors and turns them into floats only in `flush`, once per log line, after one
all-reduce that averages them over the ranks.  Expert loads (`experts/...` statistics that are
vectors) become each expert's share of the load, the smallest share and cv² of the load.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from mtvision import distributed as dist
from mtvision.engine.objective import StepRecord


class LogWindow:
    """Sums of per-step values since the last `flush`, with the images seen and the time taken."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.images = 0
        self.start = self.clock()

    def add(self, record: StepRecord) -> None:
        """Count one (taken) step's values."""
        self.steps += 1
        self.images += record.images
        for prefix, values in (("loss/", record.losses), ("regularizer/", record.regularizers), ("", record.stats)):
            for key, value in values.items():
                name = prefix + key
                self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def flush(self, world_size: int = 1) -> dict[str, float]:
        """The window's means as `train/...` floats (averaged over ranks), then an empty window.

        `train/loss` is the sum of the task losses; `train/images_per_s` counts every rank's images."""
        elapsed = max(self.clock() - self.start, 1e-9)
        out: dict[str, float] = {"train/images_per_s": self.images * world_size / elapsed}
        if self.steps == 0:
            self._reset()
            return out
        names = sorted(self.sums)
        if names:
            flat = torch.cat([self.sums[n].detach().float().reshape(-1) for n in names]) / self.steps
            if dist.world_size() > 1:
                dist.all_reduce_mean_(flat)
            values = flat.cpu().tolist()
            offset = 0
            for n in names:
                size = self.sums[n].numel()
                part = values[offset : offset + size]
                offset += size
                if size == 1:
                    out[f"train/{n}"] = part[0]
                else:
                    out.update(_shares(f"train/{n}", part))
        losses = [v for k, v in out.items() if k.startswith("train/loss/")]
        if losses:
            out["train/loss"] = sum(losses)
        self._reset()
        return out


def _shares(name: str, load: list[float]) -> dict[str, float]:
    """Each expert's share of `load` (`name/e<i>`), the smallest (`name/min_share`, 0 = a dead
    expert) and cv² of the load (`name/cv2`); nothing for an empty load."""
    total = sum(load)
    if total <= 0:
        return {}
    out = {f"{name}/e{i}": v / total for i, v in enumerate(load)}
    mean = total / len(load)
    out[f"{name}/min_share"] = min(load) / total
    out[f"{name}/cv2"] = sum((v - mean) ** 2 for v in load) / len(load) / mean**2
    return out
