"""Boundary detection: odsF in Python, computed as the SEISM / BSDS boundary benchmark computes it."""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch
from scipy.sparse import csr_matrix, eye, hstack
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

from mtvision.metrics.base import Meter, check_same_spatial
from mtvision.metrics.thinning import GROUP, thin_packed


def bsds_thresholds(count: int) -> np.ndarray:
    """The BSDS threshold grid: `count` evenly spaced values strictly inside (0, 1)."""
    return np.linspace(1.0 / (count + 1), 1.0 - 1.0 / (count + 1), count)


def match_offsets(max_dist: float) -> list[tuple[int, int]]:
    """Pixel offsets (dy, dx) with Euclidean length <= max_dist, nearest first (ties in a fixed order)."""
    r = int(math.floor(max_dist))
    offsets = [
        (dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= max_dist**2 + 1e-9
    ]
    return sorted(offsets, key=lambda o: (o[0] ** 2 + o[1] ** 2, o))


OUTLIER_COST = 100.0  # correspondPixels' cost of an unmatched pixel, in units of max_dist


class GtNeighbourhood:
    """The pixels within max_dist of each gt boundary pixel of an H x W map, for matching.

    `zone[q]` is the row of pixel q (flat index) in `pairs`, or -1 when no gt pixel is within
    max_dist; `pairs` (zone pixels x gt pixels, CSR) holds a 1 for every pair within max_dist.
    """

    def __init__(self, gt: np.ndarray, max_dist: float) -> None:
        h, w = gt.shape
        gy, gx = np.nonzero(gt)
        self.num_gt = gy.size
        self.max_dist = float(max_dist)
        offsets = np.array(match_offsets(max_dist), dtype=np.int64).reshape(-1, 2)
        qy = gy[None, :] - offsets[:, :1]
        qx = gx[None, :] - offsets[:, 1:]
        inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        q = (qy * w + qx)[inside]
        g = np.broadcast_to(np.arange(self.num_gt), inside.shape)[inside]
        in_zone = np.zeros(h * w, dtype=bool)
        in_zone[q] = True
        self.zone = np.full(h * w, -1, dtype=np.int64)
        self.zone[in_zone] = np.arange(int(in_zone.sum()))
        self.pairs = csr_matrix((np.ones(q.size), (self.zone[q], g)), shape=(int(in_zone.sum()), self.num_gt))

    def matches(self, pred: np.ndarray) -> int:
        """Number of matched pairs of the min-cost one-to-one assignment between the predicted
        pixels `pred` (flat indices) and the gt pixels, as correspondPixels defines it (a matched
        pair costs its distance, an unmatched pixel OUTLIER_COST x max_dist).

        With that outlier cost every extra matched pair saves far more than any change of
        distances costs, so the assignment is a maximum matching and only its size is needed:
        every predicted pixel gets a private outlier column (cost 2, a pair costs 1), so that a
        full matching exists, and scipy's min_weight_full_bipartite_matching (LAPJVsp) finds the
        optimum.  (scipy's maximum_bipartite_matching gives the same size but can take minutes
        on some boundary graphs.)
        """
        rows = self.zone[pred]
        rows = rows[rows >= 0]
        if rows.size == 0 or self.num_gt == 0:
            return 0
        outlier = eye(rows.size, format="csr") * 2.0
        graph = hstack([self.pairs[rows], outlier], format="csr")
        _, cols = min_weight_full_bipartite_matching(graph)
        return int(np.count_nonzero(cols < self.num_gt))


def one_to_one_matches(bmaps: np.ndarray, gt: np.ndarray, max_dist: float) -> np.ndarray:
    """Per threshold, the number of (predicted, gt) boundary pixel pairs of the one-to-one
    correspondence BSDS's correspondPixels computes: the min-cost assignment within max_dist
    (Euclidean, inclusive) where a pair costs its distance and an unmatched pixel 100 x max_dist,
    solved exactly (see `GtNeighbourhood.matches`).  As the outlier cost is far above any
    distance, this is a maximum matching.  bmaps: (T, H, W) bool predicted maps; gt: (H, W) bool.
    """
    bmaps = np.asarray(bmaps, dtype=bool)
    neighbourhood = GtNeighbourhood(np.asarray(gt, dtype=bool), max_dist)
    flat = bmaps.reshape(bmaps.shape[0], -1)
    return np.array([neighbourhood.matches(np.flatnonzero(m)) for m in flat], dtype=np.int64)


def threshold_levels(prob: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per pixel, the number of thresholds t with prob >= t (NaN: 0), so `prob >= thresholds[k]`
    is `level > k` for increasing thresholds."""
    level = np.searchsorted(thresholds, prob, side="right")
    level[np.isnan(prob)] = 0
    return level


def thinned_maps(level: np.ndarray, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (k, thinned map k as a bool H x W array) for k < count, map k being `level > k`
    thinned (bwmorph 'thin'); maps are thinned 8 at a time as the bits of one uint8 image."""
    h, w = level.shape
    for g0 in range(0, count, GROUP):
        img = np.zeros((h + 2, w + 2), dtype=np.uint8)
        inner = img[1:-1, 1:-1]
        for k in range(min(GROUP, count - g0)):
            inner |= (level > g0 + k).view(np.uint8) << np.uint8(k)
        thin_packed(img)
        for k in range(min(GROUP, count - g0)):
            yield g0 + k, ((inner >> np.uint8(k)) & 1).view(bool)


def image_boundary_counts(
    prob: np.ndarray, gt: np.ndarray, valid: np.ndarray, thresholds: np.ndarray, tolerance: float
) -> np.ndarray:
    """Boundary counts of one H x W image as a (T, 4) array: for each threshold t, the numbers of
    [matched predicted pixels, predicted pixels, matched gt pixels, gt pixels] (matched counts are
    equal: the matching is one-to-one).

    At threshold t the prediction is `prob >= t`, thinned to one-pixel strokes; pixels outside
    `valid` are then dropped from prediction and gt.  max_dist = tolerance x diagonal of the
    bounding box of the valid pixels (the unpadded image); distances are Euclidean, <= max_dist.
    Thresholds must be increasing.
    """
    counts = np.zeros((len(thresholds), 4), dtype=np.int64)
    rows, cols = np.nonzero(valid)
    if rows.size == 0:
        return counts
    max_dist = tolerance * math.hypot(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    gt = gt & valid
    counts[:, 3] = int(gt.sum())
    neighbourhood = GtNeighbourhood(gt, max_dist) if counts[0, 3] else None
    level = threshold_levels(np.asarray(prob, dtype=np.float64), np.asarray(thresholds, dtype=np.float64))
    previous = None
    for k, bmap in thinned_maps(level, len(thresholds)):
        pred = np.flatnonzero(bmap & valid)
        counts[k, 1] = pred.size
        if neighbourhood is None:
            continue
        if previous is not None and previous[0].size == pred.size and np.array_equal(previous[0], pred):
            counts[k, 0] = previous[1]  # same thinned map as at the previous threshold
        else:
            counts[k, 0] = neighbourhood.matches(pred)
        previous = (pred, counts[k, 0])
    counts[:, 2] = counts[:, 0]
    return counts


def _bsds_max_f(p: np.ndarray, r: np.ndarray) -> tuple[int, float, float, float]:
    """(segment, P, R, F) of the best F on the P/R curve with linear interpolation between adjacent
    thresholds at 100 points per segment, as BSDS's collect_eval_bdry finds the ODS point."""
    f0 = 2 * p[0] * r[0] / (p[0] + r[0]) if p[0] + r[0] > 0 else 0.0
    if p.size < 2:
        return 0, float(p[0]), float(r[0]), float(f0)
    d = np.linspace(0.0, 1.0, 100)[None, :]
    pi = p[1:, None] * d + p[:-1, None] * (1 - d)
    ri = r[1:, None] * d + r[:-1, None] * (1 - d)
    with np.errstate(divide="ignore", invalid="ignore"):
        fi = np.where(pi + ri > 0, 2 * pi * ri / (pi + ri), 0.0)
    best = int(np.argmax(fi))
    if not fi.flat[best] > f0:
        return 0, float(p[0]), float(r[0]), float(f0)
    return best // 100, float(pi.flat[best]), float(ri.flat[best]), float(fi.flat[best])


_PARALLEL_MIN_PIXELS = 100_000  # smaller images are scored in the calling process
_POOLS: dict[int, ProcessPoolExecutor] = {}


def _shared_pool(workers: int) -> ProcessPoolExecutor | None:
    """One process pool per worker count for the whole process (spawned, so CUDA/threads are safe);
    None where child processes cannot be started (e.g. inside a daemonic process)."""
    if workers not in _POOLS:
        try:
            if multiprocessing.current_process().daemon:
                return None
            _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        except (OSError, ValueError, RuntimeError):
            return None
    return _POOLS[workers]


@atexit.register
def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


class BoundaryMeter(Meter):
    """'odsF', 'odsP', 'odsR' (%): optimal-dataset-scale boundary F-measure, as SEISM / BSDS compute it.

    At each of `thresholds` levels (BSDS grid 1/(T+1) … T/(T+1)) the probability map is binarised
    (>= t) and thinned (bwmorph 'thin'); predicted and gt boundary pixels are matched one-to-one
    within max_dist = tolerance x image diagonal by a maximum matching, which has the count of
    BSDS's correspondPixels (min-cost assignment with outlier cost; see `one_to_one_matches`); the
    counts are summed over the dataset per threshold (P = matched predicted / predicted,
    R = recalled gt / gt) and ODS is the best F = 2PR / (P + R) on the P/R curve interpolated
    between adjacent thresholds, as BSDS's collect_eval_bdry does.  Checked against pyEdgeEval's
    port of correspondPixels in tests/metrics/test_boundary_seism.py.  Conventions kept:
      - the gt boundary map is used as given (not thinned);
      - the diagonal is that of the bounding box of non-ignored pixels, i.e. the unpadded image.
    Pixels whose gt equals `ignore_index` are dropped from prediction and gt (after thinning).

    `workers` > 1 scores images of at least 100k pixels in that many spawned processes (shared by
    all meters of a process), asynchronously: `update` returns at once and the results are added
    before the state is read.  Default min(4, CPU count); 1 scores in the calling process.
    """

    higher_is_better = {"odsF": True, "odsP": True, "odsR": True}

    def __init__(
        self, tolerance: float = 0.011, ignore_index: int = 255, thresholds: int = 99, workers: int | None = None
    ) -> None:
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}")
        if thresholds < 1:
            raise ValueError(f"thresholds must be >= 1, got {thresholds}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.tolerance = float(tolerance)
        self.ignore_index = int(ignore_index)
        self.num_thresholds = int(thresholds)
        self.thresholds = bsds_thresholds(self.num_thresholds)
        self.workers = int(workers) if workers is not None else min(4, os.cpu_count() or 1)
        self._pending: list[Future] = []
        super().__init__()

    # state: four blocks of T values: matched predicted, predicted, recalled gt, gt pixels
    def state_size(self) -> int:
        return 4 * self.num_thresholds

    def config(self) -> tuple:
        return (self.tolerance, self.ignore_index, self.num_thresholds)

    def _add_counts(self, counts: np.ndarray) -> None:
        self._add(torch.from_numpy(counts.T.reshape(-1).astype(np.float64)))

    def _collect(self, keep: int = 0) -> None:
        """Add the results of pending images until at most `keep` are still pending."""
        while len(self._pending) > keep:
            self._add_counts(self._pending.pop(0).result())

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: probabilities N x 1 x H x W; target: N x 1 x H x W in {0, 1}, `ignore_index` = ignore."""
        check_same_spatial(pred, target, "BoundaryMeter")
        probs = pred.detach().reshape(pred.shape[0], *pred.shape[-2:]).double().cpu().numpy()
        targets = target.detach().reshape(target.shape[0], *target.shape[-2:]).double().cpu().numpy()
        pool = None
        if self.workers > 1 and probs[0].size >= _PARALLEL_MIN_PIXELS:
            pool = _shared_pool(self.workers)
        counts = np.zeros((self.num_thresholds, 4), dtype=np.int64)
        for prob, tgt in zip(probs, targets):
            valid = tgt != self.ignore_index
            args = (prob, (tgt > 0.5) & valid, valid, self.thresholds, self.tolerance)
            if pool is None:
                counts += image_boundary_counts(*args)
                continue
            self._pending.append(pool.submit(image_boundary_counts, *args))
            self._collect(keep=2 * self.workers)  # bounded backlog
        self._add_counts(counts)

    def state(self) -> Tensor:
        self._collect()
        return super().state()

    def load_state(self, state: Tensor) -> None:
        self._collect()
        super().load_state(state)

    def merge(self, other: Meter) -> None:
        self._collect()
        if isinstance(other, BoundaryMeter):
            other._collect()
        super().merge(other)

    def all_reduce(self, group=None) -> None:
        self._collect()
        super().all_reduce(group)

    def reset(self) -> None:
        self._collect()
        super().reset()

    def __getstate__(self) -> dict:
        self._collect()
        return {**self.__dict__, "_pending": []}

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, F) per threshold as fractions; undefined values are 0."""
        self._collect()
        tp, predicted, recalled, num_gt = self._state.numpy().reshape(4, self.num_thresholds)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(predicted > 0, tp / predicted, 0.0)
            r = np.where(num_gt > 0, recalled / num_gt, 0.0)
            f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return p, r, f

    def compute(self) -> dict[str, float]:
        """ODS F, precision and recall in %, as SEISM / BSDS report them (see the class docstring).

        'odsF': best dataset-wide F on the P/R curve interpolated between thresholds; 'odsP',
        'odsR': precision and recall there.  NaN for all three before any gt or predicted
        boundary pixel has been seen.
        """
        p, r, _ = self.pr_curve()
        _, predicted, _, num_gt = self._state.numpy().reshape(4, self.num_thresholds)
        if num_gt.sum() <= 0 and predicted.sum() <= 0:
            return {"odsF": float("nan"), "odsP": float("nan"), "odsR": float("nan")}
        _, best_p, best_r, best_f = _bsds_max_f(p, r)
        return {"odsF": 100.0 * best_f, "odsP": 100.0 * best_p, "odsR": 100.0 * best_r}


__all__ = [
    "BoundaryMeter",
    "GtNeighbourhood",
    "bsds_thresholds",
    "image_boundary_counts",
    "match_offsets",
    "one_to_one_matches",
    "threshold_levels",
]
