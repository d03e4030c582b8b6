"""Model selection on the validation split: one score per evaluation, higher is better."""

from __future__ import annotations

import math
from collections.abc import Mapping

from mtvision.errors import MTVisionError
from mtvision.tasks import Task

Metrics = Mapping[str, Mapping[str, float]]


class SelectionError(MTVisionError, ValueError):
    """The selection metric does not name a metric the evaluation produces."""


def _direction(tasks: Mapping[str, Task], task: str, metric: str) -> bool:
    """True when a higher value of `task`'s `metric` is better."""
    meter = tasks[task].new_meter()
    table = getattr(meter, "higher_is_better", {})
    if metric not in table:
        raise SelectionError(f"task {task!r} has no metric {metric!r} (it has: {', '.join(sorted(table))})")
    return bool(table[metric])


class Selector:
    """Scores validation results by `select_metric`: 'delta_m' (primary-metric Δm% against
    `references`, or against the run's first evaluation when no references are given) or
    '<task>.<metric>' such as 'semseg.mIoU' (negated when lower is better)."""

    def __init__(self, select_metric: str, tasks: Mapping[str, Task], references: Metrics | None = None) -> None:
        self.select_metric = select_metric
        self.tasks = dict(tasks)
        self.references = {t: dict(m) for t, m in references.items()} if references else None
        if select_metric != "delta_m":
            task, _, metric = select_metric.partition(".")
            if task not in self.tasks or not metric:
                raise SelectionError(
                    f"train.select_metric must be 'delta_m' or '<task>.<metric>' with a task of this run "
                    f"({', '.join(self.tasks)}), got {select_metric!r}"
                )
            self.higher = _direction(self.tasks, task, metric)
        self.best: float | None = None
        self.best_step: int | None = None

    def score(self, metrics: Metrics) -> float:
        """The selection score of one evaluation (higher is better; NaN when it cannot be scored yet)."""
        if self.select_metric == "delta_m":
            if self.references is None:
                primary = [metrics[t][task.primary_metric] for t, task in self.tasks.items()]
                if not all(math.isfinite(v) and v != 0 for v in primary):
                    return float("nan")  # no usable reference yet: wait for a later evaluation
                self.references = {t: dict(m) for t, m in metrics.items()}
            return delta_m_primary(metrics, self.references, self.tasks)
        task, _, metric = self.select_metric.partition(".")
        value = metrics[task][metric]
        return value if self.higher else -value

    def update(self, metrics: Metrics, step: int) -> tuple[float, bool]:
        """Score `metrics`; returns (score, whether it is the best so far)."""
        value = self.score(metrics)
        improved = math.isfinite(value) and (self.best is None or value > self.best)
        if improved:
            self.best, self.best_step = value, step
        return value, improved

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "references": self.references}

    def load_state_dict(self, state: Mapping) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.references = state["references"]


def delta_m_primary(metrics: Metrics, references: Metrics, tasks: Mapping[str, Task]) -> float:
    """Δm% over each task's primary metric: 100/T Σ_t (−1)^{l_t} (M_t − S_t) / S_t (positive: better)."""
    from mtvision.metrics import delta_m

    primary = {name: task.primary_metric for name, task in tasks.items()}
    directions = {name: {primary[name]: _direction(tasks, name, primary[name])} for name in tasks}
    return delta_m(metrics, references, primary=primary, higher_is_better=directions)
