"""Boundary detection: odsF in Python, an approximation of the SEISM / BSDS boundary benchmark."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial
from mtvision.metrics.thinning import thin


def bsds_thresholds(count: int) -> np.ndarray:
    """The BSDS threshold grid: `count` evenly spaced values strictly inside (0, 1)."""
    return np.linspace(1.0 / (count + 1), 1.0 - 1.0 / (count + 1), count)


def match_offsets(max_dist: float) -> list[tuple[int, int]]:
    """Pixel offsets (dy, dx) with Euclidean length <= max_dist, nearest first (ties in a fixed order)."""
    r = int(math.floor(max_dist))
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= max_dist**2 + 1e-9]
    return sorted(offsets, key=lambda o: (o[0] ** 2 + o[1] ** 2, o))


def _pack_thresholds(bmaps: np.ndarray) -> np.ndarray:
    """(T, H, W) bool -> (H, W, K) uint64: bit t of a pixel's words is its map at threshold t."""
    t, h, w = bmaps.shape
    nbytes = -(-t // 8)
    words = -(-nbytes // 8)
    out = np.zeros((h, w, words * 8), dtype=np.uint8)
    out[..., :nbytes] = np.packbits(bmaps, axis=0).transpose(1, 2, 0)
    return out.view(np.uint64)


def _count_bits(words: np.ndarray, count: int) -> np.ndarray:
    """Per-threshold number of set bits over all pixels of packed maps (inverse of _pack_thresholds)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1)[..., :count]
    return bits.reshape(-1, count).sum(axis=0, dtype=np.int64)


def one_to_one_matches(bmaps: np.ndarray, gt: np.ndarray, max_dist: float) -> np.ndarray:
    """Per threshold, the number of (predicted, gt) boundary pixel pairs of a one-to-one matching
    within max_dist: pairs are taken greedily from the nearest offset outwards, so each pixel is
    used at most once (BSDS's correspondPixels solves the min-cost assignment instead).

    bmaps: (T, H, W) bool predicted maps; gt: (H, W) bool.  All thresholds are matched at once, as
    bits of packed words, one array operation per offset.
    """
    t, h, w = bmaps.shape
    pred_free = _pack_thresholds(bmaps)
    gt_free = _pack_thresholds(np.broadcast_to(gt, bmaps.shape))
    for dy, dx in match_offsets(max_dist):
        py0, py1, px0, px1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
        if py0 >= py1 or px0 >= px1:
            continue
        p = pred_free[py0:py1, px0:px1]
        g = gt_free[py0 + dy : py1 + dy, px0 + dx : px1 + dx]
        pairs = p & g  # pred pixel at q and gt pixel at q + (dy, dx), both still free
        p ^= pairs
        g ^= pairs
    return bmaps.reshape(t, -1).sum(axis=1) - _count_bits(pred_free, t)


def image_boundary_counts(
    prob: np.ndarray, gt: np.ndarray, valid: np.ndarray, thresholds: np.ndarray, tolerance: float
) -> np.ndarray:
    """Boundary counts of one H x W image as a (T, 4) array: for each threshold t, the numbers of
    [matched predicted pixels, predicted pixels, matched gt pixels, gt pixels] (matched counts are
    equal: the matching is one-to-one).

    At threshold t the prediction is `prob >= t`, thinned to one-pixel strokes; pixels outside
    `valid` are then dropped from prediction and gt.  max_dist = tolerance x diagonal of the
    bounding box of the valid pixels (the unpadded image); distances are Euclidean, <= max_dist.
    """
    counts = np.zeros((len(thresholds), 4), dtype=np.int64)
    rows, cols = np.nonzero(valid)
    if rows.size == 0:
        return counts
    max_dist = tolerance * math.hypot(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    gt = gt & valid
    bmaps = thin(prob[None] >= thresholds[:, None, None]) & valid
    counts[:, 1] = bmaps.reshape(len(thresholds), -1).sum(axis=1)
    counts[:, 3] = int(gt.sum())
    if counts[0, 3] == 0:
        return counts
    matched = one_to_one_matches(bmaps, gt, max_dist)
    counts[:, 0] = matched
    counts[:, 2] = matched
    return counts


class BoundaryMeter(Meter):
    """'odsF', 'odsP', 'odsR' (%): optimal-dataset-scale boundary F-measure, a Python APPROXIMATION of SEISM.

    Follows the BSDS/SEISM benchmark: at each of `thresholds` levels (BSDS grid 1/(T+1) … T/(T+1))
    the probability map is binarised (>= t) and thinned (bwmorph 'thin' algorithm); predicted and gt
    boundary pixels are matched within max_dist = tolerance x image diagonal; the counts are summed
    over the dataset per threshold (P = matched predicted / predicted, R = recalled gt / gt) and ODS
    takes the threshold with the best F = 2PR / (P + R).  Differences from the MATLAB tool, so the
    numbers are close to but not identical with published ones:
      - correspondence is one-to-one like BSDS's correspondPixels, but found greedily (pairs
        taken from the nearest offset outwards) instead of by min-cost assignment: the matching
        can be a little smaller than the optimal one, so P and R can come out slightly lower;
        dense or noisy predictions cannot match one gt pixel many times;
      - the gt boundary map is used as given (not thinned);
      - no sub-threshold interpolation of the P/R curve (BSDS interpolates between thresholds);
      - the diagonal is that of the bounding box of non-ignored pixels, i.e. the unpadded image.
    Pixels whose gt equals `ignore_index` are dropped from prediction and gt (after thinning).
    """

    higher_is_better = {"odsF": True, "odsP": True, "odsR": True}

    def __init__(self, tolerance: float = 0.011, ignore_index: int = 255, thresholds: int = 99) -> None:
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}")
        if thresholds < 1:
            raise ValueError(f"thresholds must be >= 1, got {thresholds}")
        self.tolerance = float(tolerance)
        self.ignore_index = int(ignore_index)
        self.num_thresholds = int(thresholds)
        self.thresholds = bsds_thresholds(self.num_thresholds)
        super().__init__()

    # state: four blocks of T values: matched predicted, predicted, recalled gt, gt pixels
    def state_size(self) -> int:
        return 4 * self.num_thresholds

    def config(self) -> tuple:
        return (self.tolerance, self.ignore_index, self.num_thresholds)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: probabilities N x 1 x H x W; target: N x 1 x H x W in {0, 1}, `ignore_index` = ignore."""
        check_same_spatial(pred, target, "BoundaryMeter")
        probs = pred.detach().reshape(pred.shape[0], *pred.shape[-2:]).double().cpu().numpy()
        targets = target.detach().reshape(target.shape[0], *target.shape[-2:]).double().cpu().numpy()
        counts = np.zeros((self.num_thresholds, 4), dtype=np.int64)
        for prob, tgt in zip(probs, targets):
            valid = tgt != self.ignore_index
            counts += image_boundary_counts(prob, (tgt > 0.5) & valid, valid, self.thresholds, self.tolerance)
        self._add(torch.from_numpy(counts.T.reshape(-1).astype(np.float64)))

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, F) per threshold as fractions; undefined values are 0."""
        tp, predicted, recalled, num_gt = self._state.numpy().reshape(4, self.num_thresholds)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(predicted > 0, tp / predicted, 0.0)
            r = np.where(num_gt > 0, recalled / num_gt, 0.0)
            f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return p, r, f

    def compute(self) -> dict[str, float]:
        """ODS F, precision and recall in % (an approximation of SEISM; see the class docstring).

        'odsF': best dataset-wide F over thresholds; 'odsP', 'odsR': precision and recall there.
        NaN for all three before any gt or predicted boundary pixel has been seen.
        """
        _, predicted, _, num_gt = self._state.numpy().reshape(4, self.num_thresholds)
        if num_gt.sum() <= 0 and predicted.sum() <= 0:
            return {"odsF": float("nan"), "odsP": float("nan"), "odsR": float("nan")}
        p, r, f = self.pr_curve()
        best = int(np.argmax(f))
        return {"odsF": 100.0 * float(f[best]), "odsP": 100.0 * float(p[best]), "odsR": 100.0 * float(r[best])}


__all__ = ["BoundaryMeter", "bsds_thresholds", "image_boundary_counts", "match_offsets", "one_to_one_matches"]
