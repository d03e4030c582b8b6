"""Measured FLOPs of backbone stages and task heads, and the FLOPs of a branching tree.

FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts for one image: convolutions and
matrix products at 2 FLOPs per multiply-add (a 3x3 convolution: 2·C_in·C_out·9·H_out·W_out);
normalisation, activations and resizing are not counted.  A tree runs stage k once per group, so
spec FLOPs = Σ_k copies(k) · stage_flops[k] + Σ_t head_flops[t].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtvision.errors import MTVisionError
from mtvision.models.branching_spec import BranchingSpec, SpecError

if TYPE_CHECKING:
    from mtvision.models.decoders.branched import BranchedDecoder


class BudgetError(MTVisionError, ValueError):
    """A FLOPs budget that no branching tree can meet."""


@dataclass(frozen=True)
class FlopsTable:
    """FLOPs of one image at `input_size` (H, W): per backbone stage, and per task (neck + head)."""

    input_size: tuple[int, int]
    stages: tuple[float, ...]
    heads: Mapping[str, float]


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """FLOPs that `fn(*args, **kwargs)` performs (FlopCounterMode's count)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


@contextlib.contextmanager
def _measuring(*modules: nn.Module) -> Iterator[None]:
    """Eval mode (no batch-norm statistics move) and no autograd; training flags restored after."""
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def _first_param(module: nn.Module) -> torch.Tensor | None:
    return next(iter(module.parameters()), None)


def stage_flops(stages: Sequence[nn.Module], input_size: Sequence[int], channels_in: int = 3) -> list[float]:
    """FLOPs of each stage, run in sequence on one `channels_in` x H x W image of `input_size`."""
    h, w = (int(s) for s in input_size)
    ref = next((p for s in stages if (p := _first_param(s)) is not None), None)
    x = torch.zeros(
        1,
        channels_in,
        h,
        w,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    out = []
    with _measuring(*stages):
        for stage in stages:
            with FlopCounterMode(display=False) as counter:
                x = stage(x)
            out.append(float(counter.get_total_flops()))
    return out


def measure(decoder: BranchedDecoder, input_size: Sequence[int]) -> FlopsTable:
    """Stage and per-task (neck + head) FLOPs of a `BranchedDecoder` for one image of `input_size`."""
    h, w = (int(s) for s in input_size)
    stages = [decoder.stage_copy(k, 0) for k in range(decoder.spec.num_stages)]
    table = stage_flops(stages, (h, w))
    ref = _first_param(decoder)
    images = torch.zeros(
        1, 3, h, w, device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None
    )
    heads = {}
    with _measuring(decoder):
        feats = _run(stages, images)
        for t in decoder.tasks:
            heads[t] = count_flops(lambda t=t: decoder.heads[t](decoder.necks[t](feats)))
    return FlopsTable((h, w), tuple(table), heads)


def _run(stages: Sequence[nn.Module], images: torch.Tensor) -> list[torch.Tensor]:
    out, x = [], images
    for s in stages:
        x = s(x)
        out.append(x)
    return out


def _heads_total(head_flops: float | Mapping[str, float], tasks: Sequence[str]) -> float:
    if isinstance(head_flops, Mapping):
        missing = [t for t in tasks if t not in head_flops]
        if missing:
            raise SpecError(f"head FLOPs are missing for task(s) {missing}")
        return float(sum(head_flops[t] for t in tasks))
    return float(head_flops) * len(tasks)


def spec_flops(
    spec: BranchingSpec, table: Sequence[float] | FlopsTable, head_flops: float | Mapping[str, float] | None = None
) -> float:
    """FLOPs of the tree `spec` for one image: Σ_k copies(k)·table[k] + the tasks' head FLOPs.

    `head_flops` is one figure per task (a mapping) or the same figure for every task; with a
    `FlopsTable` it defaults to the table's heads, otherwise to 0.
    """
    if isinstance(table, FlopsTable):
        head_flops = table.heads if head_flops is None else head_flops
        table = table.stages
    if len(table) != spec.num_stages:
        raise SpecError(f"the FLOPs table has {len(table)} stages but the spec has {spec.num_stages}")
    backbone = sum(spec.num_copies(k) * float(f) for k, f in enumerate(table))
    return backbone + _heads_total(head_flops or 0.0, spec.tasks)


def cheapest_flops(
    table: Sequence[float] | FlopsTable, tasks: Sequence[str], head_flops: float | Mapping[str, float] | None = None
) -> float:
    """FLOPs of the cheapest tree: every stage shared by all tasks."""
    n = len(table.stages if isinstance(table, FlopsTable) else table)
    return spec_flops(BranchingSpec.all_shared(tasks, n), table, head_flops)


def costliest_flops(
    table: Sequence[float] | FlopsTable, tasks: Sequence[str], head_flops: float | Mapping[str, float] | None = None
) -> float:
    """FLOPs of the most expensive tree: a separate network per task."""
    n = len(table.stages if isinstance(table, FlopsTable) else table)
    return spec_flops(BranchingSpec.separate(tasks, n), table, head_flops)


def check_budget(
    budget: float,
    table: Sequence[float] | FlopsTable,
    tasks: Sequence[str],
    head_flops: float | Mapping[str, float] | None = None,
) -> None:
    """Raise BudgetError when a FLOPs `budget` is below the cheapest tree's FLOPs (or not positive)."""
    low = cheapest_flops(table, tasks, head_flops)
    high = costliest_flops(table, tasks, head_flops)
    if not budget > 0:
        raise BudgetError(f"a FLOPs budget must be positive, got {budget!r}")
    if budget < low:
        raise BudgetError(
            f"FLOPs budget {format_flops(budget)} is below the cheapest tree ({format_flops(low)}, every stage "
            f"shared by {len(tasks)} tasks); trees range from {format_flops(low)} to {format_flops(high)} "
            "(a separate network per task)"
        )


def format_flops(flops: float) -> str:
    """A FLOPs count for people: '1.82 GFLOPs'."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOPs"
