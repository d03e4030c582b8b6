"""Δm%: the average relative improvement of a multi-task model over single-task references.

Δm% = 100 / T · Σ_t (−1)^{l_t} (M_t − S_t) / S_t, with l_t = 1 when lower is better, so a positive
Δm means the multi-task model is better on average.  LibMTL and the Nash-MTL
line of papers report the opposite sign (lower is better, e.g. EW +5.6 on NYUv2): compare their
tables with −Δm.  T counts the metrics that enter the sum: one
primary metric per task, or every metric of every task (the all-metrics variant).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from mtvision.errors import MTVisionError

Metrics = Mapping[str, Mapping[str, float]]


class ReferencesError(MTVisionError, ValueError):
    """Single-task references that are missing, malformed or do not cover the results."""


def delta_m(
    results: Metrics,
    references: Metrics,
    primary: Mapping[str, str] | None,
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> float:
    """Δm% of `results` against `references`.

    primary: task -> the one metric that counts for it; None for the all-metrics variant (every
    metric of `higher_is_better[task]` that both results and references have counts, equally).
    """
    terms = []
    for task, metrics in results.items():
        names = [primary[task]] if primary is not None else list(higher_is_better.get(task, {}))
        for name in names:
            if task not in references or name not in references[task]:
                raise ReferencesError(f"no single-task reference for {task}.{name}")
            if name not in metrics:
                raise ReferencesError(f"results have no {task}.{name}")
            if name not in higher_is_better.get(task, {}):
                raise ReferencesError(f"unknown direction for {task}.{name} (higher or lower is better?)")
            s, m = float(references[task][name]), float(metrics[name])
            if s == 0 or not math.isfinite(s):
                raise ReferencesError(f"reference {task}.{name} = {s} cannot be divided by")
            sign = 1.0 if higher_is_better[task][name] else -1.0
            terms.append(sign * (m - s) / s)
    if not terms:
        raise ReferencesError("Δm needs at least one metric")
    return 100.0 * sum(terms) / len(terms)


def load_references(path: str | Path, tasks: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Single-task references {task: {metric: value}} from a JSON file (that mapping, or the metrics
    file `mtv-eval` writes), checked for `tasks`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReferencesError(f"references file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ReferencesError(f"references file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):  # an `mtv-eval` metrics file
        data = data["metrics"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ReferencesError(f"references file {path} must map task -> {{metric: value}}")
    for task, metrics in data.items():
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ReferencesError(f"{path}: {task}.{name} must be a number, got {value!r}")
    missing = [t for t in tasks or [] if t not in data]
    if missing:
        raise ReferencesError(f"references file {path} has no entry for task(s) {missing}")
    return {t: {k: float(v) for k, v in m.items()} for t, m in data.items()}
