import math

import numpy as np
import pytest
import torch

from mtvision.metrics import NormalsMeter
from mtvision.metrics.normals import BIN_DEG


def _maps(pred_vectors, gt_vectors):
    p = torch.tensor(pred_vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)
    g = torch.tensor(gt_vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)
    return p, g


def test_known_angles_0_90_60_and_invalid_pixel():
    s, c = math.sin(math.radians(60)), math.cos(math.radians(60))
    pred, gt = _maps(
        [[0, 0, 1], [1, 0, 0], [s, 0, c], [1, 0, 0]],
        [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]],  # last pixel invalid
    )
    m = NormalsMeter()
    m.update(pred * 3.0, gt)  # scale must not matter: the prediction is L2-normalised
    out = m.compute()
    assert out["mean"] == pytest.approx(50.0, abs=1e-4)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 90**2 + 60**2) / 3), abs=1e-4)
    assert out["median"] == pytest.approx(60.0, abs=BIN_DEG / 2 + 1e-6)
    for key in ("11.25", "22.5", "30"):
        assert out[key] == pytest.approx(100.0 / 3)


def test_zero_prediction_scores_90_degrees():
    pred, gt = _maps([[0, 0, 0]], [[0, 1, 0]])
    m = NormalsMeter()
    m.update(pred, gt)
    assert m.compute()["mean"] == pytest.approx(90.0)


def test_histogram_median_within_half_bin_and_merge_is_pooled():
    rng = np.random.default_rng(0)
    gt = torch.zeros(4, 3, 8, 9)
    gt[:, 2] = 1.0
    gt[1, :, :3] = 0.0  # invalid block
    pred = gt + torch.from_numpy(rng.normal(size=(4, 3, 8, 9)).astype(np.float32)) * 0.5
    pred[:, 2] = pred[:, 2].abs() + 0.1
    whole = NormalsMeter()
    whole.update(pred, gt)
    parts = [NormalsMeter() for _ in range(2)]
    parts[0].update(pred[:3], gt[:3])
    parts[1].update(pred[3:], gt[3:])
    parts[0].merge(parts[1])
    assert torch.allclose(parts[0].state(), whole.state())
    valid = gt.abs().sum(1) > 0
    p = torch.nn.functional.normalize(pred.double(), dim=1)
    ang = torch.rad2deg(torch.acos((p * gt.double()).sum(1).clamp(-1, 1)))[valid].numpy()
    out = whole.compute()
    assert out["median"] == pytest.approx(np.median(ang), abs=BIN_DEG / 2 + 1e-9)
    assert out["mean"] == pytest.approx(ang.mean(), abs=1e-6)
    assert out["rmse"] == pytest.approx(np.sqrt((ang**2).mean()), abs=1e-6)
    assert out["22.5"] == pytest.approx(100.0 * (ang < 22.5).mean())
