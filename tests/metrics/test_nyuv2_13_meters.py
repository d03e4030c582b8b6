"""The NYUv2-13 benchmark's nine metrics, as MTAN's release computes them, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from mtvision.metrics.nyuv2_13 import (
    METRICS,
    NYUV2_13_BENCHMARK,
    SINGLE_TASK_REFERENCES,
    BenchmarkDepthMeter,
    BenchmarkNormalsMeter,
    BenchmarkSegmentationMeter,
    delta_m_nine,
    delta_m_papers,
    mean_metrics,
)


def _depth_batches():
    p1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    g1 = torch.tensor([[[[2.0, 2.0], [0.0, 2.0]]]])  # errors 1, 0, (invalid), 2 -> abs 1, rel (.5 + 0 + 1) / 3
    p2 = torch.tensor([[[[1.0]]]])
    g2 = torch.tensor([[[[4.0]]]])  # error 3 -> abs 3, rel .75
    empty = (torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))  # no valid pixel: skipped
    return [(p1, g1), (p2, g2), empty]


def test_depth_batch_averaging_weighs_batches_equally():
    meter = BenchmarkDepthMeter("batch")
    for p, g in _depth_batches():
        meter.update(p, g)
    out = meter.compute()
    assert out["abs_err"] == pytest.approx((1.0 + 3.0) / 2)
    assert out["rel_err"] == pytest.approx((0.5 + 0.75) / 2)


def test_depth_pixel_averaging_weighs_pixels_equally():
    meter = BenchmarkDepthMeter("pixel")
    for p, g in _depth_batches():
        meter.update(p, g)
    out = meter.compute()
    assert out["abs_err"] == pytest.approx((1 + 0 + 2 + 3) / 4)
    assert out["rel_err"] == pytest.approx((0.5 + 0 + 1 + 0.75) / 4)


def test_depth_uses_the_raw_prediction():
    meter = BenchmarkDepthMeter("pixel")
    meter.update(torch.tensor([[[[-1.0]]]]), torch.tensor([[[[2.0]]]]))  # not clamped to 0: error 3
    assert meter.compute()["abs_err"] == pytest.approx(3.0)


def _at_angle(degrees: list[float]) -> torch.Tensor:
    """N x 3 x 1 x W predictions at the given angles from +z, in the x-z plane (unnormalised)."""
    r = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    return (2.0 * torch.stack([torch.sin(r), torch.zeros_like(r), torch.cos(r)]))[None, :, None, :]


def _normals_batches():
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    g1 = up.view(1, 3, 1, 1).expand(1, 3, 1, 3)
    # batch 2: one valid pixel at 5 deg, one zero gt and one unit gt whose components sum to 0 (both invalid)
    g2 = torch.stack([up, torch.zeros(3, dtype=torch.float64), torch.tensor([0.5**0.5, -(0.5**0.5), 0.0], dtype=torch.float64)],
                     dim=1)[None, :, None, :]
    return [(_at_angle([10.0, 20.0, 40.0]), g1), (_at_angle([5.0, 90.0, 0.0]), g2)]


def test_normals_batch_averaging_averages_per_batch_statistics():
    meter = BenchmarkNormalsMeter("batch")
    for p, g in _normals_batches():
        meter.update(p, g)
    out = meter.compute()
    assert out["mean"] == pytest.approx(((10 + 20 + 40) / 3 + 5) / 2)
    assert out["median"] == pytest.approx((20 + 5) / 2)  # the mean of the per-batch medians
    assert out["11.25"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert out["22.5"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert out["30"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_normals_pixel_averaging_pools_every_valid_pixel():
    meter = BenchmarkNormalsMeter("pixel")
    for p, g in _normals_batches():
        meter.update(p, g)
    out = meter.compute()
    assert out["mean"] == pytest.approx((10 + 20 + 40 + 5) / 4)
    assert out["median"] == pytest.approx((10 + 20) / 2, abs=0.01)  # 0.01-degree histogram
    assert out["11.25"] == pytest.approx(50.0)
    assert out["22.5"] == pytest.approx(75.0)
    assert out["30"] == pytest.approx(75.0)


def test_a_perfect_normal_scores_zero_degrees():
    meter = BenchmarkNormalsMeter("pixel")
    g = torch.tensor([0.0, 0.6, 0.8]).view(1, 3, 1, 1)
    meter.update(g * 3.0, g)
    assert meter.compute()["mean"] == pytest.approx(0.0, abs=1e-4)


def test_segmentation_pools_one_confusion_matrix():
    meter = BenchmarkSegmentationMeter(3)
    target = torch.tensor([[[0, 0, 1, 1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1, 0, 2]]])
    meter.update(pred[:, :, :3], target[:, :, :3])  # two batches: the matrix is pooled
    meter.update(pred[:, :, 3:], target[:, :, 3:])
    out = meter.compute()
    # IoU: class 0 1/3, class 1 2/3, class 2 0 (its only prediction is on an ignored pixel)
    assert out["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert out["pixAcc"] == pytest.approx(100 * 3 / 5)


def test_segmentation_miou_is_nan_when_a_class_never_occurs():
    meter = BenchmarkSegmentationMeter(4)
    meter.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 2]]]))
    assert math.isnan(meter.compute()["mIoU"])  # the release's mean over all classes, 0/0 for class 3


@pytest.mark.parametrize("meter_cls", [BenchmarkDepthMeter, BenchmarkNormalsMeter])
def test_batch_statistics_merge_like_one_pass(meter_cls):
    batches = _depth_batches() if meter_cls is BenchmarkDepthMeter else _normals_batches()
    whole, a, b = meter_cls("batch"), meter_cls("batch"), meter_cls("batch")
    for i, (p, g) in enumerate(batches):
        whole.update(p, g)
        (a if i % 2 else b).update(p, g)
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute())
    with pytest.raises(ValueError):
        a.merge(meter_cls("pixel"))
    with pytest.raises(ValueError, match="averaging"):
        meter_cls("image")


def test_delta_m_is_zero_at_the_references_and_signed_both_ways():
    refs = {t: dict(m) for t, m in SINGLE_TASK_REFERENCES.items()}
    assert delta_m_nine(refs) == pytest.approx(0.0)
    better = {t: dict(m) for t, m in refs.items()}
    better["semseg"]["mIoU"] *= 1.09  # +9% on one of nine metrics
    assert delta_m_nine(better) == pytest.approx(1.0)
    assert delta_m_papers(better) == pytest.approx(-1.0)  # the papers: lower is better
    worse = {t: dict(m) for t, m in refs.items()}
    worse["depth"]["abs_err"] *= 1.18  # a lower-is-better metric 18% up
    assert delta_m_nine(worse) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="normals"):
        delta_m_nine({"semseg": refs["semseg"], "depth": refs["depth"]})


def test_the_benchmark_covers_nine_metrics_and_averages_epochs():
    assert sum(len(v) for v in METRICS.values()) == 9
    assert NYUV2_13_BENCHMARK.last_epochs == 10 and set(NYUV2_13_BENCHMARK.tasks) == set(METRICS)
    assert set(NYUV2_13_BENCHMARK.meters("pixel")) == set(METRICS)
    history = [{"depth": {"abs_err": 1.0}}, {"depth": {"abs_err": 2.0}}, {"depth": {"abs_err": 6.0}}]
    assert mean_metrics(history) == {"depth": {"abs_err": 3.0}}
