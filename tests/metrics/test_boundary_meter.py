import math

import numpy as np
import pytest
import torch

from mtvision.metrics import BoundaryMeter
from mtvision.metrics.boundary import bsds_thresholds

H = W = 20
TOL = 1.5 / math.hypot(H, W)  # max_dist = 1.5 px on a 20 x 20 image


def _gt_line(col=10):
    t = torch.zeros(1, 1, H, W)
    t[..., col] = 1.0
    return t


def _pred_line(cols, prob=0.8, rows=slice(None)):
    p = torch.zeros(1, 1, H, W)
    for c in cols if isinstance(cols, (list, tuple)) else [cols]:
        p[0, 0, rows, c] = prob
    return p


def test_bsds_threshold_grid():
    assert np.allclose(bsds_thresholds(99), np.arange(1, 100) / 100)
    assert BoundaryMeter().num_thresholds == 99


def test_shift_within_tolerance_is_perfect():
    m = BoundaryMeter(tolerance=TOL)
    m.update(_pred_line(11), _gt_line())
    assert m.compute() == pytest.approx({"odsF": 100.0, "odsP": 100.0, "odsR": 100.0})


def test_shift_beyond_tolerance_scores_zero():
    m = BoundaryMeter(tolerance=TOL)
    m.update(_pred_line(12), _gt_line())  # 2 px > 1.5 px
    assert m.compute() == pytest.approx({"odsF": 0.0, "odsP": 0.0, "odsR": 0.0})
    wide = BoundaryMeter(tolerance=2.0 / math.hypot(H, W))  # tolerance is inclusive
    wide.update(_pred_line(12), _gt_line())
    assert wide.compute()["odsF"] == pytest.approx(100.0)


def test_half_matched_and_best_threshold_chosen():
    pred = _pred_line(11, rows=slice(0, 10)) + _pred_line(15, rows=slice(10, 20))
    pred[0, 0, :, 2] = 0.3  # weak far-away line: hurts precision only for thresholds <= 0.3
    m = BoundaryMeter(tolerance=TOL)
    m.update(pred, _gt_line())
    p, r, f = m.pr_curve()
    t = m.thresholds
    assert np.allclose(p[t <= 0.3], 10 / 40) and np.allclose(p[(t > 0.3) & (t <= 0.8)], 0.5)
    # gt rows 0..9 are matched one-to-one by pred rows 0..9; pred (9, 11) is also within sqrt(2) of
    # gt (10, 10), but it is already used: one-to-one matching recalls 10 / 20
    assert np.allclose(r[t <= 0.8], 10 / 20) and np.allclose(f[t > 0.8], 0.0)
    assert m.compute() == pytest.approx({"odsF": 50.0, "odsP": 50.0, "odsR": 50.0})


def test_thick_prediction_is_thinned_before_matching():
    m = BoundaryMeter(tolerance=TOL)
    m.update(_pred_line([9, 10, 11, 12, 13]), _gt_line(11))
    # thinned to the centre column 11; unthinned, columns 9 and 13 would be false positives (P = 60%)
    assert m.compute()["odsP"] == pytest.approx(100.0)


def test_ignored_pixels_dropped_from_prediction_and_gt():
    target = _gt_line()
    target[..., :6] = 255
    pred = _pred_line([3, 11])
    m = BoundaryMeter(tolerance=TOL)
    m.update(pred, target)
    assert m.compute() == pytest.approx({"odsF": 100.0, "odsP": 100.0, "odsR": 100.0})


def test_merge_equals_single_pass():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 1, H, W, generator=g)
    target = (torch.rand(3, 1, H, W, generator=g) > 0.8).float()
    whole, a, b = (BoundaryMeter(tolerance=0.05, thresholds=9) for _ in range(3))
    whole.update(pred, target)
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    a.merge(b)
    assert torch.equal(a.state(), whole.state())
    with pytest.raises(ValueError):
        a.merge(BoundaryMeter(tolerance=0.05, thresholds=5))


def test_matching_is_one_to_one_and_nearest_first():
    # two predicted lines flank the gt line, both 1 px away: only one of them can be matched
    m = BoundaryMeter(tolerance=TOL)
    m.update(_pred_line([9, 11]), _gt_line(10))
    assert m.compute() == pytest.approx({"odsF": 100 * 2 * 0.5 / 1.5, "odsP": 50.0, "odsR": 100.0})
    # a prediction on the gt line takes it at distance 0; its neighbour stays unmatched
    from mtvision.metrics.boundary import one_to_one_matches

    bmaps = np.zeros((1, 5, 5), bool)
    bmaps[0, 2, 2] = bmaps[0, 2, 3] = True
    gt = np.zeros((5, 5), bool)
    gt[2, 2] = True
    assert one_to_one_matches(bmaps, gt, 1.5).tolist() == [1]


def test_matching_is_a_maximum_matching():
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    from mtvision.metrics.boundary import one_to_one_matches

    rng = np.random.default_rng(0)
    for _ in range(20):
        pred = rng.random((3, 12, 12)) > 0.85
        gt = rng.random((12, 12)) > 0.85
        got = one_to_one_matches(pred, gt, 1.5)
        for k in range(3):
            p, g = np.argwhere(pred[k]), np.argwhere(gt)
            close = cdist(p, g) <= 1.5
            rows, cols = linear_sum_assignment(~close)  # maximum matching of the "close" graph
            assert got[k] == int(close[rows, cols].sum())


def test_interpolated_ods_between_thresholds():
    # P/R (1, 0.5) at t <= 0.5 and (0.5, 1) above: F is 2/3 at both, and 0.75 half-way between
    m = BoundaryMeter(thresholds=3, workers=1)
    m.load_state(torch.tensor([2, 2, 2, 2, 2, 4, 2, 2, 4, 4, 4, 4], dtype=torch.float64))
    p, r, f = m.pr_curve()
    assert np.allclose(p, [1, 1, 0.5]) and np.allclose(r, [0.5, 0.5, 1]) and np.allclose(f, [2 / 3, 2 / 3, 2 / 3])
    ods = m.compute()
    assert ods["odsF"] == pytest.approx(75.0, abs=0.01)
    assert ods["odsP"] == pytest.approx(75.0, abs=0.5) and ods["odsR"] == pytest.approx(75.0, abs=0.5)


@pytest.mark.slow
def test_worker_processes_give_the_single_process_state():
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(3, 1, 320, 320, generator=g)
    target = (torch.rand(3, 1, 320, 320, generator=g) > 0.97).float()
    inline, parallel = BoundaryMeter(thresholds=9, workers=1), BoundaryMeter(thresholds=9, workers=2)
    for i in range(3):
        inline.update(pred[i : i + 1], target[i : i + 1])
        parallel.update(pred[i : i + 1], target[i : i + 1])
    assert torch.equal(parallel.state(), inline.state()) and inline.state().sum() > 0


def test_random_noise_scores_far_below_a_good_prediction():
    gt = torch.zeros(1, 1, 48, 48)
    gt[..., 10, :] = gt[..., :, 30] = 1.0
    noise = torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    good = 0.1 * noise + 0.9 * gt
    scores = {}
    for name, pred in (("noise", noise), ("good", good)):
        m = BoundaryMeter(tolerance=0.011)
        m.update(pred, gt)
        scores[name] = m.compute()["odsF"]
    assert scores["good"] > 90 and scores["noise"] < 40
