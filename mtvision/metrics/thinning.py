"""Morphological thinning of binary maps to one-pixel-wide strokes (MATLAB bwmorph(…, 'thin', Inf))."""

from __future__ import annotations

import numpy as np

# Neighbour x_i of a pixel (row, col) as (d_row, d_col), i = 1..8: E, NE, N, NW, W, SW, S, SE.
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))

# Maps thinned together: bit k of a byte of a packed image is map k of a group.
GROUP = 8


def _thinning_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables for the two sub-iterations, indexed by the 8-bit neighbour code (bit i-1 = x_i).

    The conditions are those of the parallel algorithm in Lam, Lee & Suen, "Thinning Methodologies -
    A Comprehensive Survey" (1992, p. 879), which MATLAB's bwmorph 'thin' cites:
      G1: Hilditch crossing number X_H = 1;  G2: 2 <= min(n1, n2) <= 3;
      G3 (first pass):  (x2 | x3 | ~x8) & x1 == 0;  G3' (second pass): (x6 | x7 | ~x4) & x5 == 0.
    These tables are the specification; `_deletion_mask` evaluates the same conditions bitwise.
    """
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [None] + [(code >> i) & 1 for i in range(8)] + [code & 1]  # x[1..8], x[9] = x[1]
        crossing = sum(1 for i in range(1, 5) if not x[2 * i - 1] and (x[2 * i] or x[2 * i + 1]))
        n1 = sum(x[2 * k - 1] | x[2 * k] for k in range(1, 5))
        n2 = sum(x[2 * k] | x[2 * k + 1] for k in range(1, 5))
        if crossing != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        first[code] = not ((x[2] | x[3] | (1 - x[8])) & x[1])
        second[code] = not ((x[6] | x[7] | (1 - x[4])) & x[5])
    return first, second


_LUT_FIRST, _LUT_SECOND = _thinning_luts()


def _deletion_mask(img: np.ndarray, box: tuple[int, int, int, int], second: bool) -> np.ndarray:
    """Pixels of img[r0:r1, c0:c1] that one sub-iteration deletes (uint8, bit k = map k).

    img: zero-bordered uint8 image whose bit k is map k, so that every bitwise operation below
    evaluates the deletion conditions of `_thinning_luts` for 8 maps at once; box lies inside the
    border.
    """
    r0, r1, c0, c1 = box
    x1, x2, x3, x4, x5, x6, x7, x8 = (img[r0 + dr : r1 + dr, c0 + dc : c1 + dc] for dr, dc in _NEIGHBOURS)
    o1, o2, o3, o4 = x1 | x2, x3 | x4, x5 | x6, x7 | x8  # the terms of n1
    e1, e2, e3, e4 = x2 | x3, x4 | x5, x6 | x7, x8 | x1  # the terms of n2
    # G1: exactly one of the crossing terms b_i = ~x_(2i-1) & (x_2i | x_(2i+1)) is set
    b1, b2, b3, b4 = e1 & ~x1, e2 & ~x3, e3 & ~x5, e4 & ~x7
    keep = (b1 & b2) | (b3 & b4)  # two or more set (given an odd count)
    b1 ^= b2
    b1 ^= b3
    b1 ^= b4
    out = img[r0:r1, c0:c1] & b1 & ~keep
    # G2: 2 <= min(n1, n2) <= 3
    for t1, t2, t3, t4 in ((o1, o2, o3, o4), (e1, e2, e3, e4)):
        a12, a34 = t1 & t2, t3 & t4
        out &= a12 | a34 | ((t1 | t2) & (t3 | t4))  # at least two of the four terms
        keep = a12 & a34 if t1 is o1 else keep & a12 & a34  # all four terms (n1 == n2 == 4)
    # G3: (x2 | x3 | ~x8) & x1 == 0, or (x6 | x7 | ~x4) & x5 == 0 in the second sub-iteration
    keep |= ((e3 | ~x4) & x5) if second else ((e1 | ~x8) & x1)
    out &= ~keep
    return out


def _box(mask: np.ndarray, r0: int, c0: int) -> tuple[int, int, int, int] | None:
    """Bounding box (r0, r1, c0, c1) of the non-zero pixels of mask, offset by (r0, c0); None if none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return r0 + int(rows[0]), r0 + int(rows[-1]) + 1, c0 + int(cols[0]), c0 + int(cols[-1]) + 1


def thin_packed(img: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Thin, in place, the 8 maps held as the bits of a zero-bordered uint8 image (H+2, W+2); returns img.

    A sub-iteration only re-examines the pixels next to those deleted in the two sub-iterations
    before it (a pixel's deletion test depends on its 3 x 3 neighbourhood only), so the work shrinks
    with the region that is still changing.
    """
    h, w = img.shape[0] - 2, img.shape[1] - 2
    if h <= 0 or w <= 0:
        return img
    full = (1, h + 1, 1, w + 1)
    box, previous = full, full
    passes = 0
    while max_iter is None or passes < 2 * max_iter:
        deleted = _deletion_mask(img, box, bool(passes & 1))
        img[box[0] : box[1], box[2] : box[3]] ^= deleted
        changed = _box(deleted, box[0], box[2])
        passes += 1
        boxes = [b for b in (changed, previous) if b is not None]
        if not boxes:
            break
        box = (
            max(1, min(b[0] for b in boxes) - 1),
            min(h + 1, max(b[1] for b in boxes) + 1),
            max(1, min(b[2] for b in boxes) - 1),
            min(w + 1, max(b[3] for b in boxes) + 1),
        )
        previous = changed
    return img


def thin(maps: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Thin a bool H x W map or B x H x W stack until nothing changes (or `max_iter` passes).

    Objects shrink to minimally connected strokes; one-pixel-wide lines are left as they are.
    """
    maps = np.asarray(maps, dtype=bool)
    single = maps.ndim == 2
    stack = maps[None] if single else maps
    b, h, w = stack.shape
    out = np.empty_like(stack)
    for g0 in range(0, b, GROUP):
        group = stack[g0 : g0 + GROUP]
        img = np.zeros((h + 2, w + 2), dtype=np.uint8)
        for k, m in enumerate(group):
            img[1:-1, 1:-1] |= m.view(np.uint8) << np.uint8(k)
        thin_packed(img, max_iter)
        for k in range(len(group)):
            out[g0 + k] = (img[1:-1, 1:-1] >> np.uint8(k)) & 1
    return out[0] if single else out
