"""Pinhole camera intrinsics of a sample, and how each geometric transform changes them.

A sample's intrinsics live in `meta["intrinsics"]`: a 3 x 3 float64 matrix K that maps a point
(X, Y, Z) of the camera frame (OpenCV's: x right, y down, z forward) to the pixel
(u, v) = (fx X / Z + cx, fy Y / Z + cy) of the sample's current image, with pixel centres at integer
coordinates (pixel (0, 0) is centred on (0, 0)).  Every transform in `mtvision/data/transforms.py`
that moves pixels keeps K true for its output:

- crop or pad at (top, left): cx - left, cy - top;
- resize from h x w to h' x w' (pixel grids aligned at their outer edges, as `cv2.resize` and the
  centre-aligned nearest resize of the targets): f scaled by w'/w and h'/h, and
  c' = s (c + 0.5) - 0.5;
- horizontal flip of a width-w image: cx' = w - 1 - cx (the mirrored scene is seen by the same
  camera, which is also why the normals' x is negated);
- rotation about the image centre: the principal point moves with the pixels and the focal lengths
  stay (the camera turned about its optical axis, the normals turned with it; exact when fx = fy).

Depth scaling by `RandomScale` needs nothing more: a zoom by s with depth / s is the scene shrunk by s
seen by the camera whose K is the resized one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtvision.errors import DatasetError

INTRINSICS_KEY = "intrinsics"
"""The `meta` key of a sample's 3 x 3 camera matrix."""

NYUD_KINECT = (518.857901, 519.469611, 325.582449, 253.736166)
"""(fx, fy, cx, cy) of the NYU Depth v2 Kinect RGB camera at 480 x 640 (the NYU toolbox's
`camera_params.m`)."""
NYUD_FULL_SIZE = (480, 640)
NYUD_CROPS: dict[tuple[int, int], tuple[int, int]] = {(480, 640): (0, 0), (425, 560): (45, 40)}
"""NYUD image size -> (top, left) of that image in the 480 x 640 frame: the full frame (MTI-Net's
NYUD_MT), and rows 45:470, columns 40:600 (the ATRC / InvPT release's 425 x 560 images)."""


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """The 3 x 3 camera matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (float64)."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def check_intrinsics(K: Any, source: str = "sample") -> np.ndarray:
    """`K` as a float64 3 x 3 array; DatasetError unless it is a finite camera matrix with positive
    focal lengths and last row (0, 0, 1)."""
    arr = np.asarray(K, dtype=np.float64)
    if arr.shape != (3, 3) or not np.isfinite(arr).all():
        raise DatasetError(f"{source}: meta['intrinsics'] must be a finite 3 x 3 camera matrix, got shape {arr.shape}")
    if arr[0, 0] <= 0 or arr[1, 1] <= 0 or not np.array_equal(arr[2], [0.0, 0.0, 1.0]) or arr[1, 0] != 0:
        raise DatasetError(f"{source}: meta['intrinsics'] must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, got {arr.tolist()}")
    return arr


def crop_intrinsics(K: np.ndarray, top: float, left: float) -> np.ndarray:
    """K of the window whose pixel (0, 0) is pixel (top, left) of the image (negative: padding)."""
    out = np.array(K, dtype=np.float64)
    out[0, 2] -= left
    out[1, 2] -= top
    return out


def resize_intrinsics(K: np.ndarray, src: Sequence[int], dst: Sequence[int]) -> np.ndarray:
    """K after resizing an image of size src = (h, w) to dst = (h', w')."""
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    out = np.array(K, dtype=np.float64)
    out[0] *= sx
    out[1] *= sy
    out[0, 2] = sx * (K[0, 2] + 0.5) - 0.5
    out[1, 2] = sy * (K[1, 2] + 0.5) - 0.5
    return out


def hflip_intrinsics(K: np.ndarray, width: int) -> np.ndarray:
    """K after mirroring a `width`-pixel-wide image left-right (the scene mirrored, x negated)."""
    out = np.array(K, dtype=np.float64)
    out[0, 2] = width - 1 - K[0, 2]
    out[0, 1] = -K[0, 1]
    return out


def rotate_intrinsics(K: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """K after warping the image with the 2 x 3 rotation `matrix` (old pixel -> new pixel, as
    `cv2.getRotationMatrix2D` gives it): the principal point mapped, the focal lengths kept."""
    out = np.array(K, dtype=np.float64)
    out[:2, 2] = np.asarray(matrix, dtype=np.float64) @ np.array([K[0, 2], K[1, 2], 1.0])
    return out


def with_intrinsics(meta: dict[str, Any], change: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """`meta` (a fresh dict) with its intrinsics, when it has any, replaced by `change(K)`."""
    if INTRINSICS_KEY in meta:
        meta[INTRINSICS_KEY] = change(np.asarray(meta[INTRINSICS_KEY], dtype=np.float64))
    return meta


def nyud_intrinsics(size: Sequence[int]) -> np.ndarray | None:
    """The Kinect camera matrix of a NYUD image of `size` (480 x 640 or the 425 x 560 crop); None for
    other sizes (whose crop of the Kinect frame is not known)."""
    key = (int(size[0]), int(size[1]))
    if key not in NYUD_CROPS:
        return None
    top, left = NYUD_CROPS[key]
    return crop_intrinsics(intrinsics_matrix(*NYUD_KINECT), top, left)


def assumed_intrinsics(size: Sequence[int], hfov: float) -> np.ndarray:
    """The camera matrix of an image of `size` (H, W) taken by an assumed pinhole camera with a
    horizontal field of view of `hfov` degrees: square pixels, principal point at the image centre."""
    if not 0.0 < hfov < 180.0:
        raise ValueError(f"a horizontal field of view must be in (0, 180) degrees, got {hfov}")
    h, w = float(size[0]), float(size[1])
    f = 0.5 * w / math.tan(math.radians(hfov) / 2.0)
    return intrinsics_matrix(f, f, 0.5 * w, 0.5 * h)


def batch_intrinsics(metas: Sequence[Mapping[str, Any]] | None) -> torch.Tensor | None:
    """The N x 3 x 3 float32 intrinsics of a batch (its `meta` list), or None when a sample has none."""
    if not metas or any(not isinstance(m, Mapping) or INTRINSICS_KEY not in m for m in metas):
        return None
    return torch.as_tensor(np.stack([np.asarray(m[INTRINSICS_KEY], dtype=np.float64) for m in metas]), dtype=torch.float32)
