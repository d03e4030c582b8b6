"""NYUv2-13 as MTAN's authors preprocessed it: the optimiser benchmark's data (`data.dataset: nyuv2_13`).

Layout (795 train / 654 val images at 288 x 384; sample i of a split is `<i>.npy` in each folder):

    ROOT/{train,val}/image/<i>.npy    H x W x 3 float RGB (in [0, 1])
    ROOT/{train,val}/label/<i>.npy    H x W, classes 0..12, -1 = ignore
    ROOT/{train,val}/depth/<i>.npy    H x W x 1 depth, 0 = invalid
    ROOT/{train,val}/normal/<i>.npy   H x W x 3 surface normals, zero vector = invalid

The benchmark papers evaluate on `val` (the NYUv2 test images) every epoch; mtvision uses it as
the test split (`data.test_split: val`) and selects on a hold-out of `train`.

Decoding: the image is kept as stored, scaled by 255 to float32 (the raw-sample scale, so that
`to_sample` gives back the stored values and `preprocess` mean 0 / std 1 feeds the network exactly
what the release does); label -1 -> 255 (ignore), 0..12 as is; depth and normals as stored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mtvision.data.base import MultiTaskDataset, RawTransform
from mtvision.data.io import PathLike, check_finite, check_size, open_root, read_npy
from mtvision.errors import DatasetError
from mtvision.metrics.nyuv2_13 import NUM_CLASSES, NYUV2_13_BENCHMARK
from mtvision.tasks import IGNORE_INDEX

SPLITS = ("train", "val")
FOLDERS = {"image": "image", "semseg": "label", "depth": "depth", "normals": "normal"}
"""Folder of the image and of each task's target."""
CLASS_NAMES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
    "wall", "window",
)
"""The 13-class NYUv2 set (Couprie et al. 2013) in its usual order, label c being class c + 1 there."""

_INDEX = re.compile(r"^(0|[1-9][0-9]*)\.npy$")


def is_nyuv2_13_root(root: PathLike) -> bool:
    """Whether `root` holds MTAN's NYUv2-13 layout (a `train/image` or `val/image` folder)."""
    root = Path(root)
    return any((root / split / "image").is_dir() for split in SPLITS)


def decode_label(stored: np.ndarray, source: PathLike = "label") -> np.ndarray:
    """Stored labels (-1 = ignore, 0..12; integer or integral float) -> uint8 with 255 = ignore."""
    stored = np.asarray(stored)
    if stored.dtype.kind == "f":
        if not np.isfinite(stored).all() or (stored != np.round(stored)).any():
            raise DatasetError(f"label {source} holds non-integral values")
    if stored.dtype.kind not in "fiu":
        raise DatasetError(f"label {source} has dtype {stored.dtype}; expected numbers")
    values = stored.astype(np.int64)
    bad = (values < -1) | (values >= NUM_CLASSES)
    if bad.any():
        raise DatasetError(f"label {source} holds {sorted(set(values[bad].tolist()))[:5]}; expected -1..{NUM_CLASSES - 1}")
    out = values.astype(np.uint8)
    out[values == -1] = IGNORE_INDEX
    return out


class NYUv2MTAN(MultiTaskDataset):
    """MTAN's preprocessed NYUv2-13 (semseg with 13 classes, depth, normals); raw samples per `data.sample`."""

    available_tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth", "normals")
    num_classes: ClassVar[dict[str, int]] = {"semseg": NUM_CLASSES}
    class_names: ClassVar[tuple[str, ...]] = CLASS_NAMES

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        tasks: list[str] | tuple[str, ...] | None = None,
        transform: RawTransform | None = None,
    ) -> None:
        super().__init__(tasks, transform)
        self.root = open_root(root, split, SPLITS, "NYUv2-13")
        self.split = split
        folder = self.root / split / FOLDERS["image"]
        if not folder.is_dir():
            hint = (" (this looks like an NYUD-v2 release with images/ and gt_sets/: use data.dataset: nyud)"
                    if (self.root / "gt_sets").is_dir() else "")
            raise DatasetError(f"NYUv2-13 root {self.root}: no folder {split}/{FOLDERS['image']}{hint}")
        names = [p.name for p in folder.iterdir() if p.name.endswith(".npy")]
        odd = [n for n in names if not _INDEX.match(n)]
        if odd:
            raise DatasetError(f"NYUv2-13 {folder}: files must be named <index>.npy, found {odd[:3]}")
        indices = sorted(int(n[:-4]) for n in names)
        if not indices:
            raise DatasetError(f"NYUv2-13 {folder}: no .npy images")
        if indices != list(range(len(indices))):
            gap = next(i for i, v in enumerate(indices) if i != v)
            raise DatasetError(f"NYUv2-13 {folder}: images must be 0.npy .. {len(indices) - 1}.npy; {gap}.npy is missing")
        self.count = len(indices)
        for index in range(self.count):
            for task in self.tasks:
                path = self._path(task, index)
                if not path.is_file():
                    raise DatasetError(f"NYUv2-13 {split} sample {index}: missing file {path}")

    def _path(self, key: str, index: int) -> Path:
        return self.root / self.split / FOLDERS[key] / f"{index}.npy"

    def __len__(self) -> int:
        return self.count

    def load_raw(self, index: int) -> dict[str, Any]:
        path = self._path("image", index)
        image = read_npy(path, "image")
        if image.ndim != 3 or image.shape[2] != 3:
            raise DatasetError(f"image {path} must be H x W x 3, got shape {image.shape}")
        check_finite(path, image, "image")
        size = image.shape[:2]
        raw: dict[str, Any] = {"image": image.astype(np.float32) * np.float32(255.0)}
        for task in self.tasks:
            path = self._path(task, index)
            value = getattr(self, f"_load_{task}")(path)
            check_size(path, value, size, f"NYUv2-13 {task} map")
            raw[task] = value
        raw["meta"] = {"id": str(index), "size": (int(size[0]), int(size[1]))}
        return raw

    def _load_semseg(self, path: Path) -> np.ndarray:
        label = np.squeeze(read_npy(path, "label"))
        if label.ndim != 2:
            raise DatasetError(f"label {path} must be H x W, got shape {label.shape}")
        return decode_label(label, path)

    def _load_depth(self, path: Path) -> np.ndarray:
        depth = read_npy(path, "depth")
        if not (depth.ndim == 2 or (depth.ndim == 3 and depth.shape[2] == 1)):
            raise DatasetError(f"depth {path} must be H x W x 1, got shape {depth.shape}")
        depth = depth.reshape(depth.shape[:2]).astype(np.float32)
        check_finite(path, depth, "depth")
        return depth

    def _load_normals(self, path: Path) -> np.ndarray:
        normals = read_npy(path, "normal")
        if normals.ndim != 3 or normals.shape[2] != 3:
            raise DatasetError(f"normal {path} must be H x W x 3, got shape {normals.shape}")
        normals = normals.astype(np.float32)
        check_finite(path, normals, "normal")
        return normals

    def meter_info(self) -> dict[str, Any]:
        """Adds `benchmark`: the protocol whose last-epochs report the trainer gives (`engine/benchmark.py`)."""
        return {**super().meter_info(), "benchmark": NYUV2_13_BENCHMARK}

    def __repr__(self) -> str:
        return f"NYUv2MTAN(root={str(self.root)!r}, split={self.split!r}, tasks={self.tasks}, samples={len(self)})"
