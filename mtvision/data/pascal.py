"""PASCAL-Context for multi-task learning (PASCAL-MT): semseg, human parts, saliency, normals, edge.

Layout (the PASCAL_MT archive of ASTMT / MTI-Net, also used by ATRC and InvPT):
    JPEGImages/<id>.jpg, ImageSets/Context/{train,val}.txt
    semseg/VOC12/<id>.png if present, else semseg/pascal-context/<id>.png   21 classes, 255 = ignore
    human_parts/<id>.mat        PASCAL-Part `anno` struct, person parts -> 6 parts + background
    normals_distill/<id>.png    2 v / 255 - 1, kept only on classes that NYUD also labels (else zero)
    sal_distill/<id>.png        v / 255 > 0.5
    pascal-context/trainval/<id>.mat   `LabelMap` (459 classes): edges, and the normals class mask
    edge/<id>.png (optional)    prepared edges, v / 255; used instead of LabelMap when edge/ exists

Human parts follow the reference loader: every person object (class index 15) that has part annotations
paints its parts with `HUMAN_PART_MAP`, later objects over earlier ones; pixels outside parts are 0.
An image with no annotated person gets an all-background (0) map, except when `parts` is the only task:
then such images are left out, as the reference does so that every sample carries a person.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mtvision.data.base import MultiTaskDataset, RawTransform
from mtvision.data.io import (
    PathLike,
    check_size,
    open_root,
    read_image,
    read_label_png,
    read_mat,
    read_normals_png,
    read_split,
)
from mtvision.errors import DatasetError
from mtvision.tasks import IGNORE_INDEX

SPLITS = ("train", "val")
NUM_SEMSEG_CLASSES = 21
PERSON_CLASS_INDEX = 15  # 'person' in the PASCAL VOC class order
PART_NAMES = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")
SEMSEG_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""The 21 PASCAL VOC classes of the semseg task, in label order."""

# PASCAL-Part person part name -> 6-part class (the 6-part grouping of ASTMT / MTI-Net / ATRC)
HUMAN_PART_MAP: dict[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}

# PASCAL-Context (459-class LabelMap) ids whose class name also appears in the NYUD-v2 894-class list
# (without 'unknown'), plus 'tvmonitor' (427): the classes on which the distilled normals are kept,
# following the reference loader's db_info/{context,nyu}_classes.json intersection (170 classes).
NORMALS_VALID_CONTEXT_CLASSES: frozenset[int] = frozenset(
    (3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55,
     56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115,
     122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195,
     197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251,
     252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295,
     304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
     370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423,
     427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457)
)

# ------------------------------------------------------------------ boundaries from label maps
_NEIGHBOUR_BITS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))  # x1..x8: E, NE, N, ... SE


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion look-up tables (256 neighbourhood codes) of the two Guo-Hall sub-iterations."""
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [bool(code >> k & 1) for k in range(8)] + [bool(code & 1)]  # x[0..7] = x1..x8, x[8] = x1
        crossing = sum((not x[2 * i]) and (x[2 * i + 1] or x[2 * i + 2]) for i in range(4))
        n1 = sum(x[2 * k] or x[2 * k + 1] for k in range(4))
        n2 = sum(x[2 * k + 1] or x[2 * k + 2] for k in range(4))
        if crossing != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        first[code] = not ((x[1] or x[2] or not x[7]) and x[0])
        second[code] = not ((x[5] or x[6] or not x[3]) and x[4])
    return first, second


_THIN_FIRST, _THIN_SECOND = _thinning_tables()


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning of a binary H x W mask to one-pixel-wide curves (Guo-Hall, two sub-iterations)."""
    image = np.asarray(mask, dtype=bool).copy()
    height, width = image.shape
    while True:
        changed = False
        for table in (_THIN_FIRST, _THIN_SECOND):
            padded = np.pad(image, 1)
            code = np.zeros(image.shape, dtype=np.uint8)
            for bit, (dr, dc) in enumerate(_NEIGHBOUR_BITS):
                code |= padded[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width].astype(np.uint8) << bit
            delete = image & table[code]
            if delete.any():
                image &= ~delete
                changed = True
        if not changed:
            return image


def label_map_edges(labels: np.ndarray) -> np.ndarray:
    """Float32 {0, 1} boundaries of a label map: non-zero 4-neighbour Laplacian (mirrored border), thinned."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 2:
        raise ValueError(f"label map must be H x W, got shape {labels.shape}")
    if min(labels.shape) < 2:
        return np.zeros(labels.shape, dtype=np.float32)
    p = np.pad(labels, 1, mode="reflect")
    laplacian = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * labels
    return thin(laplacian != 0).astype(np.float32)


# ------------------------------------------------------------------ human parts
def _objects(anno: np.ndarray, source: PathLike) -> list[Any]:
    try:
        objects = anno["objects"][0, 0]
    except (ValueError, IndexError, KeyError, TypeError) as err:
        raise DatasetError(f"human parts {source}: 'anno' has no 'objects' struct array ({err})") from err
    return list(objects.ravel())


def _class_index(obj: Any, source: PathLike) -> int:
    try:
        return int(np.asarray(obj["classIndex"]).ravel()[0])
    except (ValueError, IndexError, TypeError) as err:
        raise DatasetError(f"human parts {source}: object without a numeric 'classIndex' ({err})") from err


def has_person(anno: np.ndarray, source: PathLike = "anno") -> bool:
    """True when the annotation holds a person object with a non-empty mask."""
    return any(
        _class_index(obj, source) == PERSON_CLASS_INDEX and np.asarray(obj["mask"]).sum() > 0
        for obj in _objects(anno, source)
    )


def decode_human_parts(anno: np.ndarray, size: tuple[int, int], source: PathLike = "anno") -> np.ndarray:
    """PASCAL-Part `anno` struct -> uint8 H x W map of `PART_NAMES` classes (0 where no person part)."""
    target = np.zeros(size, dtype=np.uint8)
    for obj in _objects(anno, source):
        parts = np.asarray(obj["parts"])
        if _class_index(obj, source) != PERSON_CLASS_INDEX or parts.size == 0 or parts.dtype.names is None:
            continue
        for part in parts.ravel():
            name = str(np.asarray(part["part_name"]).ravel()[0])
            if name not in HUMAN_PART_MAP:
                raise DatasetError(f"human parts {source}: unknown person part name {name!r}")
            mask = np.asarray(part["mask"]).astype(bool)
            if mask.shape != tuple(size):
                raise DatasetError(f"human parts {source}: part mask has size {mask.shape} but the image has size {size}")
            target[mask] = HUMAN_PART_MAP[name]
    return target


# ------------------------------------------------------------------ dataset
class PascalContext(MultiTaskDataset):
    """PASCAL-Context multi-task (4998 train / 5105 val); raw samples per `data.sample`."""

    available_tasks: ClassVar[tuple[str, ...]] = ("semseg", "parts", "saliency", "normals", "edge")
    num_classes: ClassVar[dict[str, int]] = {"semseg": NUM_SEMSEG_CLASSES, "parts": len(PART_NAMES)}
    class_names: ClassVar[tuple[str, ...]] = SEMSEG_CLASS_NAMES
    boundary_tolerance: ClassVar[float] = 0.0075

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        tasks: list[str] | tuple[str, ...] | None = None,
        transform: RawTransform | None = None,
    ) -> None:
        super().__init__(tasks, transform)
        self.root = open_root(root, split, SPLITS, "PASCAL-Context")
        self.split = split
        self.edge_source = "png" if (self.root / "edge").is_dir() else "LabelMap"
        ids = read_split(self.root / "ImageSets" / "Context" / f"{split}.txt")
        for sample_id in ids:
            for path in self._required_paths(sample_id):
                if not path.is_file():
                    raise DatasetError(f"PASCAL-Context {split} id {sample_id!r}: missing file {path}")
        if self.tasks == ("parts",):
            persons = self._person_table(ids)
            ids = [i for i in ids if persons[i]]
            if not ids:
                raise DatasetError(f"PASCAL-Context {split}: no image has an annotated person, so no parts samples")
        self.ids = ids

    # paths
    def _semseg_path(self, sample_id: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{sample_id}.png"
        return voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{sample_id}.png"

    def _labelmap_path(self, sample_id: str) -> Path:
        return self.root / "pascal-context" / "trainval" / f"{sample_id}.mat"

    def _task_paths(self, task: str, sample_id: str) -> list[Path]:
        if task == "semseg":
            return [self._semseg_path(sample_id)]
        if task == "parts":
            return [self.root / "human_parts" / f"{sample_id}.mat"]
        if task == "saliency":
            return [self.root / "sal_distill" / f"{sample_id}.png"]
        if task == "normals":
            return [self.root / "normals_distill" / f"{sample_id}.png", self._labelmap_path(sample_id)]
        if self.edge_source == "png":
            return [self.root / "edge" / f"{sample_id}.png"]
        return [self._labelmap_path(sample_id)]

    def _required_paths(self, sample_id: str) -> list[Path]:
        paths = [self.root / "JPEGImages" / f"{sample_id}.jpg"]
        for task in self.tasks:
            paths += self._task_paths(task, sample_id)
        return paths

    def _person_table(self, ids: list[str]) -> dict[str, bool]:
        """id -> has a person; from the reference's cache ImageSets/Parts/<split>.txt when complete, else scanned."""
        cache = self.root / "ImageSets" / "Parts" / f"{self.split}.txt"
        if cache.is_file():
            try:
                table = json.loads(cache.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                table = None
            if isinstance(table, dict) and all(isinstance(table.get(i), list) for i in ids):
                return {i: PERSON_CLASS_INDEX in table[i] for i in ids}
        return {i: has_person(self._read_anno(self._task_paths("parts", i)[0]), i) for i in ids}

    @staticmethod
    def _read_anno(path: Path) -> np.ndarray:
        return read_mat(path, keys=("anno",))["anno"]

    def _read_labelmap(self, sample_id: str) -> np.ndarray:
        path = self._labelmap_path(sample_id)
        labels = read_mat(path, keys=("LabelMap",))["LabelMap"]
        if labels.ndim != 2:
            raise DatasetError(f"LabelMap in {path} must be H x W, got shape {labels.shape}")
        return labels

    def __len__(self) -> int:
        return len(self.ids)

    def sample_id(self, index: int) -> str:
        return self.ids[index]

    def load_raw(self, index: int) -> dict[str, Any]:
        sample_id = self.ids[index]
        image = read_image(self.root / "JPEGImages" / f"{sample_id}.jpg")
        size = (int(image.shape[0]), int(image.shape[1]))
        raw: dict[str, Any] = {"image": image}
        labelmap: np.ndarray | None = None
        for task in self.tasks:
            path = self._task_paths(task, sample_id)[0]
            if task == "semseg":
                value = read_label_png(path, "semseg")
                bad = (value >= NUM_SEMSEG_CLASSES) & (value != IGNORE_INDEX)
                if bad.any():
                    raise DatasetError(f"semseg {path} holds value {int(value[bad][0])}; expected 0..20 or 255")
            elif task == "parts":
                value = decode_human_parts(self._read_anno(path), size, path)
            elif task == "saliency":
                value = (read_label_png(path, "saliency").astype(np.float32) / 255.0 > 0.5).astype(np.float32)
            elif task == "normals":
                value = read_normals_png(path)
                check_size(path, value, size, "normals map")
                labelmap = self._read_labelmap(sample_id) if labelmap is None else labelmap
                check_size(self._labelmap_path(sample_id), labelmap, size, "LabelMap")
                value[~np.isin(labelmap, list(NORMALS_VALID_CONTEXT_CLASSES))] = 0.0
            elif self.edge_source == "png":
                value = read_label_png(path, "edge map").astype(np.float32) / 255.0
            else:
                labelmap = self._read_labelmap(sample_id) if labelmap is None else labelmap
                value = label_map_edges(labelmap)
            check_size(path, value, size, f"{task} map")
            raw[task] = value
        raw["meta"] = {"id": sample_id, "size": size}
        return raw

    def __repr__(self) -> str:
        return (
            f"PascalContext(root={str(self.root)!r}, split={self.split!r}, tasks={self.tasks}, "
            f"edges from {self.edge_source}, samples={len(self)})"
        )
