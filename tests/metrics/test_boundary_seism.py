"""BoundaryMeter against pyEdgeEval, the Cython port of the BSDS/SEISM correspondPixels (dev dependency)."""

import math

import numpy as np
import torch
from pyEdgeEval._lib import correspond_pixels
from pyEdgeEval.common.metrics import compute_rec_prec_f1, interpolated_max_scores
from pyEdgeEval.preprocess import binary_thin
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from mtvision.metrics import BoundaryMeter
from mtvision.metrics.boundary import bsds_thresholds, one_to_one_matches
from mtvision.metrics.thinning import thin

H, W = 120, 160


def soft_edge_map(rng: np.random.Generator, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, gt) like a boundary network's output: gt = boundaries of a warped Voronoi
    segmentation; prediction = shifted, partly missing, blurred gt of varying strength, plus weaker
    spurious edges and a noise floor, sometimes quantised to 8 bits."""
    k = int(rng.integers(4, 14))
    seeds = np.stack([rng.uniform(0, h, k), rng.uniform(0, w, k)], 1)
    yy, xx = np.mgrid[0:h, 0:w]
    warp = ndimage.gaussian_filter(rng.normal(size=(2, h, w)), (0, 12, 12)) * rng.uniform(20, 80)
    d = (yy[None] + warp[0] - seeds[:, :1, None]) ** 2 + (xx[None] + warp[1] - seeds[:, 1:, None]) ** 2
    gt = _boundaries(d.argmin(0))
    shifted = np.roll(gt, tuple(rng.integers(-2, 3, 2)), (0, 1))
    strength = ndimage.gaussian_filter(rng.random((h, w)), 6)
    strength = (strength - strength.min()) / (np.ptp(strength) + 1e-9)
    sigma = rng.uniform(0.8, 3.0)
    dist = ndimage.distance_transform_edt(~(shifted & (strength > rng.uniform(0.0, 0.3))))
    prob = np.exp(-(dist**2) / (2 * sigma**2)) * (0.4 + 0.6 * strength)
    spurious = _boundaries(ndimage.gaussian_filter(rng.normal(size=(h, w)), rng.uniform(4, 10)) > 0)
    spur = np.exp(-(ndimage.distance_transform_edt(~spurious) ** 2) / (2 * sigma**2))
    prob = np.maximum(prob, rng.uniform(0.1, 0.6) * spur)
    prob = np.clip(prob + rng.uniform(0.0, 0.15) * ndimage.gaussian_filter(rng.random((h, w)), 1.0), 0, 1)
    if rng.random() < 0.5:
        prob = np.round(prob * 255) / 255
    return prob, gt


def _boundaries(labels: np.ndarray) -> np.ndarray:
    edges = np.zeros(labels.shape, bool)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edges


def _reference_ods(maps, thresholds, tolerance):
    """pyEdgeEval's single-gt evaluation (thinned maps, correspondPixels, pooled counts, interpolated ODS)."""
    count_r = sum_r = count_p = sum_p = 0
    for prob, gt in maps:
        bmaps = thin(prob[None] >= thresholds[:, None, None])
        matched = [correspond_pixels(b, gt, max_dist=tolerance) for b in bmaps]
        count_r = count_r + np.array([(m[1] > 0).sum() for m in matched])
        count_p = count_p + np.array([(m[0] > 0).sum() for m in matched])
        sum_r = sum_r + gt.sum()
        sum_p = sum_p + bmaps.reshape(len(thresholds), -1).sum(axis=1)
    rec, prec, _ = compute_rec_prec_f1(count_r, sum_r, count_p, sum_p)
    return 100 * interpolated_max_scores(thresholds, rec, prec)[3]


def test_odsf_agrees_with_pyedgeeval_at_nyud_and_pascal_tolerances():
    rng = np.random.default_rng(0)
    maps = [soft_edge_map(rng) for _ in range(3)]
    thresholds = bsds_thresholds(15)
    for tolerance in (0.011, 0.0075):
        meter = BoundaryMeter(tolerance=tolerance, thresholds=15, workers=1)
        for prob, gt in maps:
            meter.update(torch.from_numpy(prob)[None, None], torch.from_numpy(gt.astype(np.float32))[None, None])
        ours, reference = meter.compute()["odsF"], _reference_ods(maps, thresholds, tolerance)
        assert abs(ours - reference) <= 0.3, (tolerance, ours, reference)


def test_matches_are_correspond_pixels_counts_or_its_rare_misses():
    # correspondPixels solves the assignment on a sparse random outlier graph and now and then
    # leaves a pair unmatched; our count is the exact optimum, never below it
    rng = np.random.default_rng(1)
    prob, gt = soft_edge_map(rng)
    bmaps = thin(prob[None] >= bsds_thresholds(9)[:, None, None])
    max_dist = 0.011 * math.hypot(H, W)
    ours = one_to_one_matches(bmaps, gt, max_dist)
    reference = np.array([(correspond_pixels(b, gt, max_dist=0.011)[0] > 0).sum() for b in bmaps])
    assert np.all(ours >= reference) and np.all(ours - reference <= 0.01 * reference + 3)


def test_matches_equal_the_exact_min_cost_assignment():
    # correspondPixels' objective: distance per matched pair, 100 x max_dist per unmatched pixel
    rng = np.random.default_rng(2)
    prob, gt = soft_edge_map(rng, 60, 80)
    max_dist = 0.011 * math.hypot(60, 80)
    bmaps = thin(prob[None] >= np.array([0.2, 0.4, 0.6])[:, None, None])
    for bmap, got in zip(bmaps, one_to_one_matches(bmaps, gt, max_dist)):
        dist = cdist(np.argwhere(bmap), np.argwhere(gt))
        saving = np.where(dist <= max_dist, 2 * 100 * max_dist - dist, 0.0)  # two outliers replaced by a pair
        rows, cols = linear_sum_assignment(-saving)
        assert got == int((saving[rows, cols] > 0).sum())


def test_thinning_equals_pyedgeeval_binary_thin_on_soft_maps():
    rng = np.random.default_rng(3)
    prob, _ = soft_edge_map(rng)
    bmaps = prob[None] >= np.array([0.02, 0.1, 0.3, 0.5, 0.7])[:, None, None]
    assert np.array_equal(thin(bmaps), np.stack([binary_thin(b) for b in bmaps]))
