"""A benchmark's own report: its metrics on the test split at the end of each of the last epochs,
and their mean, as the optimiser papers report NYUv2-13 (`mtvision/metrics/nyuv2_13.py`).

A dataset that belongs to such a benchmark names it in its `meter_info()` ("benchmark"); the
trainer then keeps a `LastEpochsReport`.  The report selects nothing: mtvision's own selection on
the held-out split and its final test report are unchanged, and this one sits next to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtvision.engine.evaluator import autocast_context
from mtvision.metrics.nyuv2_13 import Benchmark, delta_m_papers, mean_metrics

Metrics = dict[str, dict[str, float]]


@torch.no_grad()
def evaluate_benchmark(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], benchmark: Benchmark, device: torch.device, amp: str = "none"
) -> dict[str, Metrics]:
    """The benchmark's metrics over `batches`, for each of its averagings ({averaging: metrics}),
    pooled over all ranks.  Predictions are scored as the release scores them: the arg-max class,
    the raw depth, the L2-normalised normals."""
    was_training = model.training
    model.eval()
    meters = {a: benchmark.meters(a) for a in benchmark.averagings}
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        with autocast_context(device, amp):
            raw = model(images, tasks=list(benchmark.tasks)).predictions
        preds = {
            "semseg": raw["semseg"].float().argmax(dim=1),
            "depth": raw["depth"].float(),
            "normals": F.normalize(raw["normals"].float(), dim=1),
        }
        for group in meters.values():
            for task, meter in group.items():
                meter.update(preds[task], batch[task].to(device, non_blocking=True))
    model.train(was_training)
    out = {}
    for averaging, group in meters.items():
        for meter in group.values():
            meter.all_reduce()
        out[averaging] = {task: meter.compute() for task, meter in group.items()}
    return out


class LastEpochsReport:
    """The benchmark's test metrics after each of the run's last `benchmark.last_epochs` epochs
    (fewer when the run is shorter), and their mean with its Δm%."""

    def __init__(self, benchmark: Benchmark, steps: int, steps_per_epoch: int) -> None:
        self.benchmark = benchmark
        self.steps = steps
        self.steps_per_epoch = steps_per_epoch
        epochs = max(1, steps // steps_per_epoch)
        self.epochs = min(benchmark.last_epochs, epochs)
        self.history: list[dict[str, Any]] = []

    @classmethod
    def for_run(cls, meter_info: Mapping[str, Any], tasks: Iterable[str], steps: int, steps_per_epoch: int):
        """The report of a run whose dataset names a benchmark and that trains all its tasks; else None."""
        benchmark = meter_info.get("benchmark")
        if not isinstance(benchmark, Benchmark) or set(benchmark.tasks) - set(tasks):
            return None
        return cls(benchmark, steps, steps_per_epoch)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (counted from 1) ends one of the last epochs (or the run)."""
        first = self.steps - self.epochs * self.steps_per_epoch
        return step > first and ((step - first) % self.steps_per_epoch == 0 or step == self.steps)

    def record(self, model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device, step: int,
               amp: str = "none") -> None:
        """Score the test split now (every rank; rank 0's BatchNorm statistics under DDP)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        self.history.append({"step": step, "metrics": evaluate_benchmark(model, batches, self.benchmark, device, amp)})

    def summary(self) -> dict[str, Any]:
        """{averaging: mean metrics} plus Δm% (the papers' sign: lower is better) and the evaluations used."""
        if not self.history:
            return {}
        out: dict[str, Any] = {"benchmark": self.benchmark.name, "epochs": len(self.history),
                               "steps": [h["step"] for h in self.history]}
        for averaging in self.benchmark.averagings:
            mean = mean_metrics([h["metrics"][averaging] for h in self.history])
            out[averaging] = {"metrics": mean, "delta_m_papers": delta_m_papers(mean, self.benchmark.references)}
        return out

    def scalars(self) -> dict[str, float]:
        """The summary as flat logger scalars (`test_last<N>/<averaging>/<task>/<metric>`)."""
        summary = self.summary()
        prefix = f"test_last{self.epochs}"
        out: dict[str, float] = {}
        for averaging in self.benchmark.averagings:
            if averaging in summary:
                part = summary[averaging]
                out.update({f"{prefix}/{averaging}/{t}/{k}": v for t, m in part["metrics"].items() for k, v in m.items()})
                out[f"{prefix}/{averaging}/delta_m_papers"] = part["delta_m_papers"]
        return out

    def format(self) -> str:
        """A few console lines: per averaging, the mean of the nine metrics and Δm%."""
        summary = self.summary()
        if not summary:
            return ""
        lines = [f"{self.benchmark.name}: test metrics, mean over the last {summary['epochs']} epoch(s) "
                 f"(as the optimiser papers report; Δm% lower is better, against their single-task references)"]
        for averaging in self.benchmark.averagings:
            part = summary[averaging]
            values = "  ".join(f"{t}.{k} {v:.4g}" for t, m in part["metrics"].items() for k, v in m.items())
            lines.append(f"  {averaging}-averaged: {values}  Δm% {part['delta_m_papers']:+.2f}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))
