"""Boundary odsF: seconds per image (old greedy + per-map thinning vs new) and agreement with pyEdgeEval.

    OMP_NUM_THREADS=1 python benchmarks/bench_boundary.py [--timing-images 5] [--agree-maps 20]
        [--agree-height 120 --agree-width 160] [--thresholds 99] [--seed 0]

Timing: the whole per-image evaluation (thresholding, thinning, matching at every threshold) of
`--timing-images` soft edge maps of 425 x 560 (NYUD) with 99 thresholds at the NYUD tolerance,
in this process on one core, old and new interleaved image by image so that load from other
processes hits both alike.  "old" is the implementation this file replaces: dense per-map lookup-
table thinning and the greedy nearest-offset-first matching (kept below as `legacy_counts`).

Agreement: odsF over `--agree-maps` soft edge maps (tests/metrics/test_boundary_seism.py's
generator) at the NYUD (0.011) and PASCAL (0.0075) tolerances, from BoundaryMeter, from the old
greedy matching, and from pyEdgeEval (the Cython port of BSDS correspondPixels, a dev dependency)
on the same thinned maps with pyEdgeEval's interpolated ODS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyEdgeEval._lib import correspond_pixels  # noqa: E402
from pyEdgeEval.common.metrics import compute_rec_prec_f1, interpolated_max_scores  # noqa: E402

from mtvision.metrics import BoundaryMeter  # noqa: E402
from mtvision.metrics.boundary import bsds_thresholds, image_boundary_counts, match_offsets  # noqa: E402
from mtvision.metrics.thinning import _LUT_FIRST, _LUT_SECOND, _NEIGHBOURS, thin  # noqa: E402
from tests.metrics.test_boundary_seism import soft_edge_map  # noqa: E402


# ---- the previous implementation, for the side-by-side timing and odsF ----------------------------
def _legacy_thin(maps: np.ndarray) -> np.ndarray:
    out = maps.copy()
    _, h, w = out.shape
    active = np.flatnonzero(out.reshape(out.shape[0], -1).any(axis=1))
    while active.size:
        sub = out[active]
        changed = np.zeros(active.size, dtype=bool)
        for lut in (_LUT_FIRST, _LUT_SECOND):
            padded = np.pad(sub, ((0, 0), (1, 1), (1, 1))).view(np.uint8)
            code = np.zeros(sub.shape, dtype=np.uint8)
            for bit, (dr, dc) in enumerate(_NEIGHBOURS):
                code |= padded[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] << np.uint8(bit)
            delete = sub & lut[code]
            changed |= delete.reshape(active.size, -1).any(axis=1)
            sub &= ~delete
        out[active] = sub
        active = active[changed]
    return out


def _pack(bmaps: np.ndarray) -> np.ndarray:
    t, h, w = bmaps.shape
    nbytes = -(-t // 8)
    out = np.zeros((h, w, -(-nbytes // 8) * 8), dtype=np.uint8)
    out[..., :nbytes] = np.packbits(bmaps, axis=0).transpose(1, 2, 0)
    return out.view(np.uint64)


def _legacy_greedy(bmaps: np.ndarray, gt: np.ndarray, max_dist: float) -> np.ndarray:
    t, h, w = bmaps.shape
    pred_free, gt_free = _pack(bmaps), _pack(np.broadcast_to(gt, bmaps.shape))
    for dy, dx in match_offsets(max_dist):
        py0, py1, px0, px1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
        if py0 >= py1 or px0 >= px1:
            continue
        p = pred_free[py0:py1, px0:px1]
        g = gt_free[py0 + dy : py1 + dy, px0 + dx : px1 + dx]
        pairs = p & g
        p ^= pairs
        g ^= pairs
    left = np.unpackbits(np.ascontiguousarray(pred_free).view(np.uint8), axis=-1)[..., :t]
    return bmaps.reshape(t, -1).sum(axis=1) - left.reshape(-1, t).sum(axis=0)


def legacy_counts(prob, gt, thresholds, tolerance, bmaps=None):
    """(T, 4) counts as the previous BoundaryMeter computed them (all pixels valid)."""
    max_dist = tolerance * math.hypot(*gt.shape)
    if bmaps is None:
        bmaps = _legacy_thin(prob[None] >= thresholds[:, None, None])
    counts = np.zeros((len(thresholds), 4), dtype=np.int64)
    counts[:, 1] = bmaps.reshape(len(thresholds), -1).sum(axis=1)
    counts[:, 3] = gt.sum()
    counts[:, 0] = counts[:, 2] = _legacy_greedy(bmaps, gt, max_dist)
    return counts


# ---- odsF from pooled counts -----------------------------------------------------------------------
def ods_from_counts(counts: np.ndarray, thresholds: np.ndarray) -> float:
    """pyEdgeEval's interpolated ODS F (%) of (T, 4) pooled counts."""
    rec, prec, _ = compute_rec_prec_f1(counts[:, 2], counts[:, 3], counts[:, 0], counts[:, 1])
    return 100 * float(interpolated_max_scores(thresholds, rec, prec)[3])


def meter_ods(maps, tolerance, thresholds: int) -> float:
    meter = BoundaryMeter(tolerance=tolerance, thresholds=thresholds, workers=1)
    for prob, gt in maps:
        meter.update(torch.from_numpy(prob)[None, None], torch.from_numpy(gt.astype(np.float32))[None, None])
    return meter.compute()["odsF"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing-images", type=int, default=5)
    parser.add_argument("--agree-maps", type=int, default=20)
    parser.add_argument("--agree-height", type=int, default=120)
    parser.add_argument("--agree-width", type=int, default=160)
    parser.add_argument("--thresholds", type=int, default=99)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    thresholds = bsds_thresholds(args.thresholds)
    rng = np.random.default_rng(args.seed)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    )

    old_s, new_s = [], []
    for i in range(args.timing_images):
        prob, gt = soft_edge_map(rng, 425, 560)
        valid = np.ones_like(gt)
        t0 = time.perf_counter()
        old = legacy_counts(prob, gt, thresholds, 0.011)
        t1 = time.perf_counter()
        new = image_boundary_counts(prob, gt, valid, thresholds, 0.011)
        t2 = time.perf_counter()
        assert np.array_equal(old[:, 1], new[:, 1]) and np.all(new[:, 0] >= old[:, 0])  # same thinning
        old_s.append(t1 - t0)
        new_s.append(t2 - t1)
        print(f"image {i}: old {old_s[-1]:.2f} s, new {new_s[-1]:.3f} s")
    timing = {
        "old_s_per_image_mean": float(np.mean(old_s)),
        "new_s_per_image_mean": float(np.mean(new_s)),
        "new_s_per_image_max": float(np.max(new_s)),
        "speedup_mean": float(np.mean(old_s) / np.mean(new_s)),
    }
    print(json.dumps(timing))

    maps = [soft_edge_map(rng, args.agree_height, args.agree_width) for _ in range(args.agree_maps)]
    rows = []
    for tolerance in (0.011, 0.0075):
        ref = np.zeros((len(thresholds), 4))
        old = np.zeros((len(thresholds), 4))
        for prob, gt in maps:
            bmaps = thin(prob[None] >= thresholds[:, None, None])
            matched = [correspond_pixels(b, gt, max_dist=tolerance) for b in bmaps]
            ref[:, 0] += [(m[0] > 0).sum() for m in matched]
            ref[:, 2] += [(m[1] > 0).sum() for m in matched]
            ref[:, 1] += bmaps.reshape(len(thresholds), -1).sum(axis=1)
            ref[:, 3] += gt.sum()
            old += legacy_counts(prob, gt, thresholds, tolerance, bmaps=bmaps)
        row = {
            "tolerance": tolerance,
            "pyedgeeval_odsF": ods_from_counts(ref, thresholds),
            "new_odsF": meter_ods(maps, tolerance, args.thresholds),
            "old_odsF": ods_from_counts(old, thresholds),
        }
        row["new_minus_pyedgeeval"] = row["new_odsF"] - row["pyedgeeval_odsF"]
        row["old_minus_pyedgeeval"] = row["old_odsF"] - row["pyedgeeval_odsF"]
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
