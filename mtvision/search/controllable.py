"""From a user's constraints to a sub-network of a controllable model (`decoders/controllable.py`).

The constraints are a compute budget (FLOPs of one image, `mtvision/search/flops.py`'s count) and a
task preference vector p (non-negative weights, normalised to sum to 1; tasks left out weigh 0).
The search follows the key rule of Aich et al. (ICCV 2023), the only part of their search their
abstract states: the preference sets the decoders, a more preferred task getting the wider
decoder, and the budget is met by choosing the encoder width jointly.  The procedure below is
mtvision's (it scores by FLOPs only, no accuracy table):

1. decoder widths at level λ > 0: task t gets the widest grid width not above
   max(w_min, min(1, λ · p_t / max_s p_s)), so a more preferred task's decoder is never narrower
   than a less preferred one's; the levels tried are the grid widths and every level at which
   some task's decoder reaches a grid width, up to all decoders at full width (tasks of weight 0
   stay at w_min);
2. every (λ, encoder width) pair whose configuration fits the budget is a candidate; those that
   express the preference best come first: the most pairs of tasks with p_s > p_t whose decoder s
   is strictly wider than decoder t (all pairs where the budget and the grid allow; none at the
   smallest budgets, where every decoder is at w_min).  Among them the chosen one maximises the
   preference-weighted compute of the task paths, Σ_t p_t · (FLOPs(encoder) + FLOPs(decoder_t))
   (the encoder counts for every task, so a stronger encoder wins where it pays), ties going to
   the cheaper configuration, then to the lower level.

A budget below the narrowest sub-network is a `WidthBudgetError`; a preference naming a task the
model does not have, or with negative or all-zero weights, a `PreferenceError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtvision.errors import MTVisionError, unknown_name
from mtvision.models.decoders.controllable import ControllableDecoder, WidthConfig, use_config
from mtvision.search.flops import BudgetError, count_flops, format_flops


class WidthBudgetError(BudgetError):
    """A FLOPs budget below the narrowest sub-network of a controllable model."""


class PreferenceError(MTVisionError, ValueError):
    """A task preference naming an unknown task, or with weights that are negative, not finite or all zero."""


@dataclass(frozen=True)
class WidthFlops:
    """FLOPs of one image at `input_size` (H, W): the encoder at each width, and each task's decoder
    at each (encoder width, decoder width) pair (its input channels follow the encoder's width)."""

    input_size: tuple[int, int]
    widths: tuple[float, ...]
    encoder: Mapping[float, float]
    decoders: Mapping[str, Mapping[tuple[float, float], float]]

    @property
    def tasks(self) -> list[str]:
        return list(self.decoders)

    def flops(self, config: WidthConfig) -> float:
        """FLOPs of the sub-network `config` (every task's decoder; tasks it leaves out at full width)."""
        e = float(config.encoder)
        total = self.encoder[e]
        for t, table in self.decoders.items():
            total += table[(e, float(config.decoders.get(t, self.widths[-1])))]
        return float(total)

    def narrowest(self) -> WidthConfig:
        return WidthConfig(self.widths[0], {t: self.widths[0] for t in self.decoders})

    def widest(self) -> WidthConfig:
        return WidthConfig(self.widths[-1], {t: self.widths[-1] for t in self.decoders})


@dataclass(frozen=True)
class WidthChoice:
    """The search's answer: the configuration, its FLOPs, the budget and the normalised preference."""

    config: WidthConfig
    flops: float
    budget: float
    preference: Mapping[str, float]


def controllable_decoder(model: nn.Module) -> ControllableDecoder:
    """The `ControllableDecoder` of a model (or the decoder itself); a PreferenceError otherwise."""
    decoder = getattr(model, "decoder", model)
    if not isinstance(decoder, ControllableDecoder):
        name = getattr(getattr(model, "config", None), "decoder", type(decoder).__name__)
        raise PreferenceError(
            f"a compute budget or task preference needs a controllable model (decoder: controllable); this model's "
            f"decoder is {name!r}"
        )
    return decoder


@contextlib.contextmanager
def _measuring(module: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def measure_widths(model: nn.Module, input_size: Sequence[int]) -> WidthFlops:
    """The `WidthFlops` of a controllable model (or decoder) for one image of `input_size`."""
    decoder = controllable_decoder(model)
    h, w = (int(s) for s in input_size)
    ref = next(decoder.parameters())
    images = torch.zeros(1, 3, h, w, device=ref.device, dtype=ref.dtype)
    widths = decoder.widths
    encoder: dict[float, float] = {}
    decoders: dict[str, dict[tuple[float, float], float]] = {t: {} for t in decoder.tasks}
    with _measuring(decoder):
        for e in widths:
            with use_config(WidthConfig(e, {})):
                encoder[e] = count_flops(decoder.backbone, images)
                features = decoder.backbone(images)
            for t, table in decoders.items():
                for d in widths:
                    with use_config(WidthConfig(e, {t: d})):
                        table[(e, d)] = count_flops(decoder.decoders[t], features)
    return WidthFlops((h, w), widths, encoder, decoders)


def normalise_preference(preference: Mapping[str, float] | None, tasks: Sequence[str]) -> dict[str, float]:
    """Task -> weight summing to 1 over `tasks` (None: equal weights; tasks left out: 0)."""
    if preference is None:
        return {t: 1.0 / len(tasks) for t in tasks}
    if not isinstance(preference, Mapping):
        raise PreferenceError(f"a task preference is a mapping task -> weight, got {type(preference).__name__}")
    for t in preference:
        if t not in tasks:
            raise PreferenceError(str(unknown_name("task in the preference", str(t), tasks)))
    values = {}
    for t in tasks:
        raw: Any = preference.get(t, 0.0)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise PreferenceError(f"the preference weight of {t!r} must be a number, got {raw!r}") from None
        if not math.isfinite(v) or v < 0:
            raise PreferenceError(f"the preference weight of {t!r} must be finite and >= 0, got {raw!r}")
        values[t] = v
    total = sum(values.values())
    if total <= 0:
        raise PreferenceError(f"a task preference needs at least one positive weight, got {dict(preference)}")
    return {t: v / total for t, v in values.items()}


def decoder_widths(preference: Mapping[str, float], widths: Sequence[float], level: float) -> dict[str, float]:
    """Step 1: each task's decoder width at `level` (the widest grid width not above
    max(w_min, min(1, level · p_t / max p)))."""
    top = max(preference.values())
    out = {}
    for t, p in preference.items():
        target = max(widths[0], min(1.0, level * p / top))
        out[t] = max(w for w in widths if w <= target + 1e-9)
    return out


def levels(preference: Mapping[str, float], widths: Sequence[float]) -> list[float]:
    """The levels at which some decoder width changes: w · max p / p_t for every grid width w and
    task of positive weight (the grid widths among them: the most preferred task's)."""
    top = max(preference.values())
    return sorted({w * top / p for w in widths for p in preference.values() if p > 0})


def candidates(table: WidthFlops, preference: Mapping[str, float]) -> list[tuple[float, WidthConfig]]:
    """Every (level, configuration) the search chooses among, before the budget (one per distinct
    decoder profile, at the lowest level that gives it)."""
    out, seen = [], set()
    for level in levels(preference, table.widths):
        decs = decoder_widths(preference, table.widths, level)
        profile = tuple(decs.values())
        if profile in seen:
            continue
        seen.add(profile)
        out += [(level, WidthConfig(e, dict(decs))) for e in table.widths]
    return out


def path_score(table: WidthFlops, config: WidthConfig, preference: Mapping[str, float]) -> float:
    """Σ_t p_t · (FLOPs(encoder) + FLOPs(decoder_t)): the preference-weighted compute of the task paths."""
    e = float(config.encoder)
    return sum(p * (table.encoder[e] + table.decoders[t][(e, float(config.decoders[t]))]) for t, p in preference.items())


def ordered_pairs(config: WidthConfig, preference: Mapping[str, float]) -> int:
    """How many pairs of tasks (s, t) with p_s > p_t have decoder s strictly wider than decoder t."""
    d = config.decoders
    return sum(1 for s, ps in preference.items() for t, pt in preference.items() if ps > pt and d[s] > d[t])


def expresses(config: WidthConfig, preference: Mapping[str, float]) -> bool:
    """Whether every more preferred task's decoder is strictly wider than every less preferred one's
    (always true for equal weights)."""
    pairs = sum(1 for ps in preference.values() for pt in preference.values() if ps > pt)
    return ordered_pairs(config, preference) == pairs


def search_widths(table: WidthFlops, budget: float, preference: Mapping[str, float] | None = None) -> WidthChoice:
    """The sub-network for a FLOPs `budget` (one image at `table.input_size`) and a task `preference`."""
    pref = normalise_preference(preference, table.tasks)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise WidthBudgetError(f"a FLOPs budget must be a positive number, got {budget!r}")
    low, high = table.flops(table.narrowest()), table.flops(table.widest())
    if budget < low:
        h, w = table.input_size
        raise WidthBudgetError(
            f"budget {format_flops(budget)} is below the smallest sub-network ({table.narrowest().describe()}: "
            f"{format_flops(low)} at {h}x{w}); this model spans {format_flops(low)} to {format_flops(high)}"
        )
    best: tuple[tuple[float, float, float, float], WidthConfig] | None = None
    for level, config in candidates(table, pref):
        cost = table.flops(config)
        if cost > budget:
            continue
        key = (float(ordered_pairs(config, pref)), path_score(table, config, pref), -cost, -level)
        if best is None or key > best[0]:
            best = (key, config)
    if best is None:  # pragma: no cover - the narrowest configuration is always a candidate
        raise WidthBudgetError(f"no sub-network fits {format_flops(budget)}")
    config = best[1]
    return WidthChoice(config, table.flops(config), float(budget), pref)
