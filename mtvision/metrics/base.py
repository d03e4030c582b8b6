"""The streaming-meter interface shared by every task metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor


class Meter(ABC):
    """A streaming metric whose whole state is one 1-D float64 vector of summable statistics.

    Because the state is a sum over pixels (or images), `merge` and `all_reduce` give exactly the
    result of a single pass over the union of the data.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {}

    def __init__(self) -> None:
        self._state = torch.zeros(self.state_size(), dtype=torch.float64)

    @abstractmethod
    def state_size(self) -> int:
        """Length of the state vector."""

    @abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate a batch: `pred` is the decoded prediction, `target` the batch target."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over everything accumulated so far."""

    def config(self) -> tuple:
        """Constructor settings that must agree for two meters to be merged."""
        return ()

    def state(self) -> Tensor:
        """A copy of the summable statistics (1-D float64, CPU)."""
        return self._state.clone()

    def load_state(self, state: Tensor) -> None:
        """Replace the statistics with `state` (as returned by `state()`)."""
        state = torch.as_tensor(state)
        if state.dim() != 1 or state.numel() != self._state.numel():
            raise ValueError(
                f"{type(self).__name__}: state must be 1-D of length {self._state.numel()}, got shape {tuple(state.shape)}"
            )
        self._state = state.detach().to(device="cpu", dtype=torch.float64).clone()

    def merge(self, other: Meter) -> None:
        """Add the statistics of `other` (same class and settings) into this meter."""
        if type(other) is not type(self) or other.config() != self.config():
            raise ValueError(
                f"cannot merge {type(other).__name__}{other.config()} into {type(self).__name__}{self.config()}"
            )
        self._state += other._state

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the statistics over all ranks when torch.distributed is initialised; no-op otherwise."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        state = self._state.clone()
        if dist.get_backend(group) == "nccl":
            state = state.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
        self._state = state.cpu()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = torch.zeros_like(self._state)

    def _add(self, stats: Tensor) -> None:
        """Add a batch's statistics (same layout as the state) into the state."""
        self._state += stats.detach().to(device="cpu", dtype=torch.float64)


def ratio(num: float, den: float) -> float:
    """num / den, or NaN when den is 0."""
    return num / den if den > 0 else float("nan")


def check_same_spatial(pred: Tensor, target: Tensor, name: str) -> None:
    """Raise ValueError unless pred and target have the same batch and spatial size."""
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} do not match")
