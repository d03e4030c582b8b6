"""Raw samples (numpy, H x W [x C]) and their conversion to the tensor sample contract.

A *raw* sample is what a dataset reads from disk, before any transform:
    image:    uint8 H x W x 3 RGB
    semseg:   uint8/int H x W, 255 = ignore          parts: same
    depth:    float32 H x W metres, 0 = invalid
    normals:  float32 H x W x 3 unit vectors, zero vector = invalid
    edge:     float32 H x W in {0, 1}, 255 = ignore
    saliency: float32 H x W in {0, 1}
    meta:     {"id": str, "size": (H, W)}, plus "intrinsics" where the dataset knows its camera:
              the 3 x 3 pinhole matrix K of this image in pixels (see `mtvision/data/camera.py`)
`to_sample` turns it into the tensor sample (image normalised 3 x H x W, label maps
int64 H x W, dense maps float32 C x H x W).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtvision.data.camera import INTRINSICS_KEY, check_intrinsics
from mtvision.errors import DatasetError
from mtvision.tasks import get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def validate_raw(raw: Mapping[str, Any], source: str = "sample") -> None:
    """Raise DatasetError when a raw sample breaks its contract (sizes, channels, finiteness)."""
    image = raw.get("image")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise DatasetError(f"{source}: image must be an H x W x 3 array, got shape {shape}")
    size = image.shape[:2]
    meta = raw.get("meta")
    if isinstance(meta, Mapping) and INTRINSICS_KEY in meta:
        check_intrinsics(meta[INTRINSICS_KEY], source)
    for name, value in raw.items():
        if name in ("image", "meta"):
            continue
        task = get_task(name)
        if value.shape[:2] != size:
            raise DatasetError(f"{source}: {name} map has size {value.shape[:2]} but the image has size {size}")
        want = task.target_channels if task.target_channels > 1 else 0
        got = value.shape[2] if value.ndim == 3 else 0
        if got != want and not (want == 0 and got == 1):
            raise DatasetError(f"{source}: {name} map must have {max(want, 1)} channel(s), got shape {value.shape}")
        if not task.is_label_map and not np.isfinite(value).all():
            raise DatasetError(f"{source}: {name} map contains NaN or Inf values")


def to_sample(
    raw: Mapping[str, Any],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """Raw numpy sample -> tensor sample (image normalised with mean/std over [0, 1] pixels)."""
    out: dict[str, Any] = {}
    image = np.asarray(raw["image"], dtype=np.float32) / 255.0
    image = (image - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    out["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    for name, value in raw.items():
        if name == "image":
            continue
        if name == "meta":
            out["meta"] = dict(value)
            continue
        task = get_task(name)
        if task.is_label_map:
            arr = np.asarray(value).reshape(value.shape[:2]).astype(np.int64)
        else:
            arr = np.asarray(value, dtype=np.float32)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out
