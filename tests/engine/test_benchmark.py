"""The benchmark's last-epochs report: which steps it scores, its mean and Δm%, its checkpoint state."""

from __future__ import annotations

import pytest
import torch

from mtvision.engine.benchmark import LastEpochsReport, evaluate_benchmark
from mtvision.metrics.nyuv2_13 import NYUV2_13_BENCHMARK, SINGLE_TASK_REFERENCES, Benchmark, BenchmarkDepthMeter
from mtvision.models import create_model


def test_it_scores_the_end_of_each_of_the_last_epochs():
    report = LastEpochsReport(Benchmark("b", last_epochs=3), steps=20, steps_per_epoch=4)
    assert [s for s in range(1, 21) if report.due(s)] == [12, 16, 20]
    short = LastEpochsReport(Benchmark("b", last_epochs=10), steps=6, steps_per_epoch=4)  # 1.5 epochs
    assert short.epochs == 1 and [s for s in range(1, 7) if short.due(s)] == [6]


def test_only_runs_of_a_benchmark_with_all_its_tasks_get_a_report():
    info = {"boundary_tolerance": 0.011, "benchmark": NYUV2_13_BENCHMARK}
    assert LastEpochsReport.for_run(info, ["semseg", "depth", "normals"], 10, 2) is not None
    assert LastEpochsReport.for_run(info, ["semseg", "depth"], 10, 2) is None
    assert LastEpochsReport.for_run({"boundary_tolerance": 0.011}, ["semseg", "depth", "normals"], 10, 2) is None


def _scaled(factor: float) -> dict:
    return {t: {k: v * factor for k, v in m.items()} for t, m in SINGLE_TASK_REFERENCES.items()}


def test_summary_is_the_mean_with_the_papers_delta_m():
    report = LastEpochsReport(NYUV2_13_BENCHMARK, steps=4, steps_per_epoch=2)
    assert report.summary() == {} and report.format() == ""
    report.history = [{"step": 2, "metrics": {"batch": _scaled(0.9), "pixel": _scaled(1.0)}},
                      {"step": 4, "metrics": {"batch": _scaled(1.1), "pixel": _scaled(1.0)}}]
    summary = report.summary()
    assert summary["epochs"] == 2 and summary["steps"] == [2, 4]
    assert summary["batch"]["metrics"]["depth"]["abs_err"] == pytest.approx(SINGLE_TASK_REFERENCES["depth"]["abs_err"])
    assert summary["batch"]["delta_m_papers"] == pytest.approx(0.0, abs=1e-9)
    scalars = report.scalars()
    assert scalars["test_last2/pixel/normals/median"] == pytest.approx(19.21)
    assert "test_last2/batch/delta_m_papers" in scalars and "Δm%" in report.format()
    restored = LastEpochsReport(NYUV2_13_BENCHMARK, steps=4, steps_per_epoch=2)
    restored.load_state_dict(report.state_dict())
    assert restored.summary() == summary


def test_evaluation_scores_the_raw_depth_and_both_averagings():
    torch.manual_seed(0)
    model = create_model(backbone={"name": "segnet", "pretrained": False, "kwargs": {"widths": [4, 4, 8, 8, 8]}},
                         decoder="mtan", tasks={"semseg": 13, "depth": None, "normals": None})
    g = torch.Generator().manual_seed(0)
    batches = []
    for size in (2, 1):
        normals = torch.nn.functional.normalize(torch.randn(size, 3, 32, 32, generator=g), dim=1)
        batches.append({"image": torch.rand(size, 3, 32, 32, generator=g),
                        "semseg": torch.randint(0, 13, (size, 32, 32), generator=g),
                        "depth": torch.rand(size, 1, 32, 32, generator=g) + 0.5, "normals": normals})
    out = evaluate_benchmark(model, batches, NYUV2_13_BENCHMARK, torch.device("cpu"))
    assert set(out) == {"batch", "pixel"} and model.training  # the mode is restored
    model.eval()
    meters = {a: BenchmarkDepthMeter(a) for a in ("batch", "pixel")}
    with torch.no_grad():
        for b in batches:
            raw = model(b["image"]).predictions["depth"]
            for m in meters.values():
                m.update(raw, b["depth"])
    for averaging, meter in meters.items():
        assert out[averaging]["depth"] == pytest.approx(meter.compute())
    # batches of 2 and 1 images: the batch average weighs the single image as much as the pair
    assert out["batch"]["depth"]["abs_err"] != pytest.approx(out["pixel"]["depth"]["abs_err"])
    assert out["batch"]["semseg"] == out["pixel"]["semseg"]
