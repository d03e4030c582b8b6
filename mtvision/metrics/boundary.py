"""Boundary detection: odsF in Python, an approximation of the SEISM / BSDS boundary benchmark."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial
from mtvision.metrics.thinning import thin


def bsds_thresholds(count: int) -> np.ndarray:
    """The BSDS threshold grid: `count` evenly spaced values strictly inside (0, 1)."""
    return np.linspace(1.0 / (count + 1), 1.0 - 1.0 / (count + 1), count)


def image_boundary_counts(
    prob: np.ndarray, gt: np.ndarray, valid: np.ndarray, thresholds: np.ndarray, tolerance: float
) -> np.ndarray:
    """Boundary counts of one H x W image as a (T, 4) array: for each threshold t, the numbers of
    [predicted pixels with a gt pixel within max_dist, predicted pixels, gt pixels with a predicted
    pixel within max_dist, gt pixels].

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
    near_gt = ndimage.distance_transform_edt(~gt) <= max_dist
    counts[:, 0] = (bmaps & near_gt).reshape(len(thresholds), -1).sum(axis=1)
    for k, bmap in enumerate(bmaps):
        if counts[k, 1]:
            counts[k, 2] = int((gt & (ndimage.distance_transform_edt(~bmap) <= max_dist)).sum())
    return counts


class BoundaryMeter(Meter):
    """'odsF', 'odsP', 'odsR' (%): optimal-dataset-scale boundary F-measure, a Python APPROXIMATION of SEISM.

    Follows the BSDS/SEISM benchmark: at each of `thresholds` levels (BSDS grid 1/(T+1) … T/(T+1))
    the probability map is binarised (>= t) and thinned (bwmorph 'thin' algorithm); predicted and gt
    boundary pixels are matched within max_dist = tolerance x image diagonal; the counts are summed
    over the dataset per threshold (P = matched predicted / predicted, R = recalled gt / gt) and ODS
    takes the threshold with the best F = 2PR / (P + R).  Differences from the MATLAB tool, so the
    numbers are close to but not identical with published ones:
      - correspondence is by distance transform, not BSDS's one-to-one min-cost assignment
        (correspondPixels): a predicted pixel is a true positive when some gt pixel lies within
        max_dist, and a gt pixel is recalled when some predicted pixel lies within max_dist, so one
        pixel may justify several on the other side (thinning keeps this rare; precision and
        recall can come out slightly higher than SEISM's);
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


__all__ = ["BoundaryMeter", "bsds_thresholds", "image_boundary_counts"]
