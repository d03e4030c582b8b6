"""NYUD-v2 for multi-task learning: semseg (40 classes), depth, normals, edge.

Two public releases share one tree (`images/`, `segmentation/`, `depth/`, `normals/`, `edge/`,
`gt_sets/{train,val}.txt`) and differ in file types; the one present is detected from the first id:

    ATRC / InvPT release:   images/<id>.png  normals/<id>.png  edge/<id>.png   (425 x 560)
    MTI-Net NYUD_MT:        images/<id>.jpg  normals/<id>.npy  edge/<id>.npy   (480 x 640)
    both:                   segmentation/<id>.png  depth/<id>.npy

Decoding: segmentation stored 0 -> 255 (ignore), v -> v - 1; depth in metres as stored (0 = invalid);
normals PNG 2 v / 255 - 1 per channel (RGB = xyz), with all-zero stored pixels -> zero vector
(invalid; the ATRC/InvPT release marks no invalid normals, so in practice every pixel is valid there);
normals NPY as stored; edge PNG v / 255, edge NPY as stored.

Camera: meta["intrinsics"] is the NYU Kinect RGB camera (`mtvision.data.camera.NYUD_KINECT`, 480 x 640)
for 480 x 640 images and its rows 45:470, columns 40:600 crop for 425 x 560 images; images of
other sizes carry none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mtvision.data.base import MultiTaskDataset, RawTransform
from mtvision.data.camera import nyud_intrinsics
from mtvision.data.io import (
    PathLike,
    check_finite,
    check_size,
    open_root,
    read_image,
    read_label_png,
    read_normals_png,
    read_npy,
    read_split,
)
from mtvision.data.nyuv2_13 import is_nyuv2_13_root
from mtvision.errors import DatasetError
from mtvision.tasks import IGNORE_INDEX

NUM_CLASSES = 40
SPLITS = ("train", "val")
CLASS_NAMES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)
"""The NYU-40 classes (Gupta et al. 2013) in label order: class c is stored as c + 1."""


@dataclass(frozen=True)
class NYUDRelease:
    """File extensions of one published NYUD multi-task release."""

    name: str
    image_ext: str
    normals_ext: str
    edge_ext: str


ATRC_RELEASE = NYUDRelease("ATRC/InvPT", ".png", ".png", ".png")
MTINET_RELEASE = NYUDRelease("MTI-Net NYUD_MT", ".jpg", ".npy", ".npy")

_TASK_DIRS = {"semseg": "segmentation", "depth": "depth", "normals": "normals", "edge": "edge"}


def decode_segmentation(stored: np.ndarray, source: PathLike = "segmentation") -> np.ndarray:
    """Stored NYU40 labels (0 = unlabeled, 1..40) -> uint8 classes 0..39 with 255 = ignore."""
    stored = np.asarray(stored)
    if stored.size and int(stored.max()) > NUM_CLASSES:
        raise DatasetError(f"segmentation {source} holds value {int(stored.max())}; NYU40 labels are 0..{NUM_CLASSES}")
    out = stored.astype(np.int64) - 1
    out[stored == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


def detect_release(root: PathLike, first_id: str) -> NYUDRelease:
    """The release whose image file exists for `first_id` (PNG: ATRC/InvPT, JPEG: MTI-Net)."""
    root = Path(root)
    for release in (ATRC_RELEASE, MTINET_RELEASE):
        if (root / "images" / f"{first_id}{release.image_ext}").is_file():
            return release
    raise DatasetError(
        f"NYUD root {root}: no image for id {first_id!r} (looked for images/{first_id}.png, ATRC/InvPT release, "
        f"and images/{first_id}.jpg, MTI-Net NYUD_MT release)"
    )


class NYUDv2(MultiTaskDataset):
    """NYUD-v2 (795 train / 654 val) in the ATRC/InvPT or MTI-Net layout; raw samples per `data.sample`."""

    available_tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth", "normals", "edge")
    num_classes: ClassVar[dict[str, int]] = {"semseg": NUM_CLASSES}
    class_names: ClassVar[tuple[str, ...]] = CLASS_NAMES
    boundary_tolerance: ClassVar[float] = 0.011

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        tasks: list[str] | tuple[str, ...] | None = None,
        transform: RawTransform | None = None,
    ) -> None:
        super().__init__(tasks, transform)
        self.root = open_root(root, split, SPLITS, "NYUD")
        self.split = split
        if is_nyuv2_13_root(self.root) and not (self.root / "gt_sets").is_dir():
            raise DatasetError(f"NYUD root {self.root} holds MTAN's preprocessed NYUv2-13 ({{train,val}}/image/<i>.npy, "
                               "13 classes), not an NYUD-v2 release: use data.dataset: nyuv2_13")
        self.ids = read_split(self.root / "gt_sets" / f"{split}.txt")
        self.release = detect_release(self.root, self.ids[0])
        for sample_id in self.ids:
            for path in [self._image_path(sample_id), *(self._task_path(t, sample_id) for t in self.tasks)]:
                if not path.is_file():
                    raise DatasetError(f"NYUD {split} id {sample_id!r}: missing file {path}")

    def _image_path(self, sample_id: str) -> Path:
        return self.root / "images" / f"{sample_id}{self.release.image_ext}"

    def _task_path(self, task: str, sample_id: str) -> Path:
        ext = {"semseg": ".png", "depth": ".npy", "normals": self.release.normals_ext, "edge": self.release.edge_ext}
        return self.root / _TASK_DIRS[task] / f"{sample_id}{ext[task]}"

    def __len__(self) -> int:
        return len(self.ids)

    def sample_id(self, index: int) -> str:
        return self.ids[index]

    def load_raw(self, index: int) -> dict[str, Any]:
        sample_id = self.ids[index]
        image = read_image(self._image_path(sample_id))
        size = image.shape[:2]
        raw: dict[str, Any] = {"image": image}
        for task in self.tasks:
            path = self._task_path(task, sample_id)
            value = getattr(self, f"_load_{task}")(path)
            check_size(path, value, size, f"NYUD {task} map")
            raw[task] = value
        raw["meta"] = {"id": sample_id, "size": (int(size[0]), int(size[1]))}
        intrinsics = nyud_intrinsics(size)
        if intrinsics is not None:  # the Kinect camera, for the releases' image sizes
            raw["meta"]["intrinsics"] = intrinsics
        return raw

    def _load_semseg(self, path: Path) -> np.ndarray:
        return decode_segmentation(read_label_png(path, "segmentation"), path)

    def _load_depth(self, path: Path) -> np.ndarray:
        depth = read_npy(path, "depth").astype(np.float32)
        depth = np.squeeze(depth)
        if depth.ndim != 2:
            raise DatasetError(f"depth {path} must be H x W, got shape {depth.shape}")
        check_finite(path, depth, "depth")
        return depth

    def _load_normals(self, path: Path) -> np.ndarray:
        if path.suffix == ".png":
            return read_normals_png(path)
        normals = read_npy(path, "normals").astype(np.float32)
        if normals.ndim != 3 or normals.shape[2] != 3:
            raise DatasetError(f"normals {path} must be H x W x 3, got shape {normals.shape}")
        check_finite(path, normals, "normals")
        return normals

    def _load_edge(self, path: Path) -> np.ndarray:
        if path.suffix == ".png":
            return read_label_png(path, "edge map").astype(np.float32) / 255.0
        edge = np.squeeze(read_npy(path, "edge").astype(np.float32))
        if edge.ndim != 2:
            raise DatasetError(f"edge {path} must be H x W, got shape {edge.shape}")
        check_finite(path, edge, "edge")
        return edge

    def __repr__(self) -> str:
        return (
            f"NYUDv2(root={str(self.root)!r}, split={self.split!r}, release={self.release.name!r}, "
            f"tasks={self.tasks}, samples={len(self)})"
        )
