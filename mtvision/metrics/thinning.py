"""Morphological thinning of binary maps to one-pixel-wide strokes (MATLAB bwmorph(…, 'thin', Inf))."""

from __future__ import annotations

import numpy as np

# Neighbour x_i of a pixel (row, col) as (d_row, d_col), i = 1..8: E, NE, N, NW, W, SW, S, SE.
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thinning_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables for the two sub-iterations, indexed by the 8-bit neighbour code (bit i-1 = x_i).

    The conditions are those of the parallel algorithm in Lam, Lee & Suen, "Thinning Methodologies -
    A Comprehensive Survey" (1992, p. 879), which MATLAB's bwmorph 'thin' cites:
      G1: Hilditch crossing number X_H = 1;  G2: 2 <= min(n1, n2) <= 3;
      G3 (first pass):  (x2 | x3 | ~x8) & x1 == 0;  G3' (second pass): (x6 | x7 | ~x4) & x5 == 0.
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


def _neighbour_codes(maps: np.ndarray) -> np.ndarray:
    """8-bit neighbour code of every pixel of a B x H x W bool stack (outside the image counts as 0)."""
    _, h, w = maps.shape
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1))).view(np.uint8)
    code = np.zeros(maps.shape, dtype=np.uint8)
    for bit, (dr, dc) in enumerate(_NEIGHBOURS):
        code |= padded[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] << np.uint8(bit)
    return code


def thin(maps: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Thin a bool H x W map or B x H x W stack until nothing changes (or `max_iter` passes).

    Objects shrink to minimally connected strokes; one-pixel-wide lines are left as they are.
    """
    maps = np.asarray(maps, dtype=bool)
    single = maps.ndim == 2
    out = (maps[None] if single else maps).copy()
    active = np.flatnonzero(out.reshape(out.shape[0], -1).any(axis=1))
    it = 0
    while active.size and (max_iter is None or it < max_iter):
        sub = out[active]
        changed = np.zeros(active.size, dtype=bool)
        for lut in (_LUT_FIRST, _LUT_SECOND):
            delete = sub & lut[_neighbour_codes(sub)]
            changed |= delete.reshape(active.size, -1).any(axis=1)
            sub &= ~delete
        out[active] = sub
        active = active[changed]
        it += 1
    return out[0] if single else out
