import math

import pytest
import torch

from mtvision.metrics import DepthMeter

GT = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
PRED = torch.tensor([[[[1.5, 2.0], [9.0, 2.0]]]])


def test_hand_computed_with_invalid_pixel():
    m = DepthMeter()
    m.update(PRED, GT)
    out = m.compute()
    assert out["rmse"] == pytest.approx(math.sqrt((0.25 + 0.0 + 4.0) / 3))
    assert out["abs_rel"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert out["delta1"] == pytest.approx(100.0 / 3)
    assert out["log_rmse"] == pytest.approx(math.sqrt((math.log(1.5) ** 2 + math.log(2.0) ** 2) / 3))


def test_rmse_is_pooled_over_pixels_not_averaged_over_images():
    gt2 = torch.full((1, 1, 1, 1), 2.0)
    pred2 = torch.full((1, 1, 1, 1), 5.0)  # one valid pixel, error 3
    a, b = DepthMeter(), DepthMeter()
    a.update(PRED, GT)
    b.update(pred2, gt2)
    a.merge(b)
    pooled = math.sqrt((0.25 + 4.0 + 9.0) / 4)
    assert a.compute()["rmse"] == pytest.approx(pooled)
    per_image_mean = (math.sqrt(4.25 / 3) + 3.0) / 2
    assert abs(pooled - per_image_mean) > 0.1
    whole = DepthMeter()
    whole.update(torch.cat([PRED, torch.nn.functional.pad(pred2, (0, 1, 0, 1))]),
                 torch.cat([GT, torch.nn.functional.pad(gt2, (0, 1, 0, 1))]))
    assert torch.allclose(whole.state(), a.state())


def test_nonpositive_predictions_are_floored_not_nan():
    m = DepthMeter()
    m.update(torch.tensor([[[[0.0, -1.0]]]]), torch.tensor([[[[1.0, 1.0]]]]))
    out = m.compute()
    assert all(math.isfinite(v) for v in out.values())
    assert out["delta1"] == 0.0
    assert out["abs_rel"] == pytest.approx(1.0, abs=1e-6)


def test_no_valid_pixels_gives_nan():
    m = DepthMeter()
    m.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert all(math.isnan(v) for v in m.compute().values())
