"""Write synthetic scenes to disk in the NYUD-v2 or the PASCAL-Context layout, and draw a preview grid of them.

The PASCAL-Context layout maps the scenes onto PASCAL's label spaces (`VOC_CLASS_OF_SYNTHETIC`,
`CONTEXT_CLASS_OF_SYNTHETIC`).  The scenes hold no people: the pillars (upright cylinders) stand in for
persons, and their human parts are a deterministic stand-in laid on each pillar's image footprint
(`stand_in_parts`), not a body model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from scipy import ndimage
from tqdm import tqdm

from mtvision import visualize
from mtvision.cv import cv2
from mtvision.data import pascal, synthetic
from mtvision.data.synthetic import generate
from mtvision.tasks import IGNORE_INDEX

PREVIEW_COLUMNS = ("image", "semseg", "depth", "normals", "edge", "saliency")


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def _normals_png(normals: np.ndarray) -> np.ndarray:
    """Unit normals (H x W x 3) as stored 8-bit RGB: round((n + 1) / 2 * 255)."""
    return np.round((normals + 1.0) * 0.5 * 255.0).clip(0, 255).astype(np.uint8)


def _check_and_ids(num: int, seed: int, val_fraction: float) -> list[str]:
    """The ids of scenes 0..num-1 of `seed` (as `synthetic.generate` names them), after checking the arguments."""
    if num < 1:
        raise ValueError(f"num must be positive, got {num}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return [f"{seed:04d}_{index:06d}" for index in range(num)]


def _write_splits(folder: Path, ids: list[str], val_fraction: float) -> None:
    """train.txt and val.txt under `folder`: the last round(len * val_fraction) ids are val."""
    split = len(ids) - int(round(len(ids) * val_fraction))
    (folder / "train.txt").write_text("".join(f"{i}\n" for i in ids[:split]))
    (folder / "val.txt").write_text("".join(f"{i}\n" for i in ids[split:]))


def write_nyud_layout(
    out: str | Path,
    num: int,
    height: int = 128,
    width: int = 160,
    seed: int = 0,
    val_fraction: float = 0.2,
    progress: bool = True,
) -> list[str]:
    """Write `num` scenes under `out` as NYUD-v2 (ATRC/InvPT release) does; returns the ids.

    images/<id>.png, segmentation/<id>.png (class + 1; 0 would be unlabelled), depth/<id>.npy
    (metres), normals/<id>.png (round((n + 1) / 2 * 255)), edge/<id>.png (0 / 255),
    gt_sets/{train,val}.txt (the last `val_fraction` of the ids are val).  Saliency, which NYUD
    does not have, goes to saliency/<id>.png (0 / 255).
    """
    ids = _check_and_ids(num, seed, val_fraction)
    root = Path(out)
    for sub in ("images", "segmentation", "depth", "normals", "edge", "saliency", "gt_sets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(num), desc="synthetic scenes", unit="scene", disable=not progress):
        sample = generate(seed, index, height, width)
        sid = sample["meta"]["id"]
        _write_png(root / "images" / f"{sid}.png", sample["image"])
        _write_png(root / "segmentation" / f"{sid}.png", (sample["semseg"].astype(np.uint16) + 1).astype(np.uint8))
        np.save(root / "depth" / f"{sid}.npy", sample["depth"])
        _write_png(root / "normals" / f"{sid}.png", _normals_png(sample["normals"]))
        _write_png(root / "edge" / f"{sid}.png", (sample["edge"] * 255).astype(np.uint8))
        _write_png(root / "saliency" / f"{sid}.png", (sample["saliency"] * 255).astype(np.uint8))
    _write_splits(root / "gt_sets", ids, val_fraction)
    return ids


# ------------------------------------------------------------------ PASCAL-Context layout
VOC_CLASS_OF_SYNTHETIC: dict[int, int] = {
    synthetic.FLOOR: 0,  # background
    synthetic.WALL: 0,  # background
    synthetic.CEILING: 0,  # background
    synthetic.TABLE: 11,  # diningtable
    synthetic.CABINET: 0,  # background: no VOC class
    synthetic.SOFA: 18,  # sofa
    synthetic.PILLAR: 15,  # person: the stand-in that carries the human parts
    synthetic.BALL: 0,  # background: no VOC class
    synthetic.PICTURE: 20,  # tvmonitor: the stand-in for a flat rectangle on a wall
    synthetic.BED: 0,  # background: no VOC class
}
"""Synthetic class -> PASCAL VOC class of the 21-class semseg task (`pascal.SEMSEG_CLASS_NAMES`)."""

CONTEXT_CLASS_OF_SYNTHETIC: dict[int, int] = {
    synthetic.FLOOR: 158,  # floor
    synthetic.WALL: 440,  # wall
    synthetic.CEILING: 68,  # ceiling
    synthetic.TABLE: 397,  # table
    synthetic.CABINET: 46,  # cabinet
    synthetic.SOFA: 368,  # sofa
    synthetic.PILLAR: 284,  # person (as in the semseg map)
    synthetic.BALL: 10,  # ball
    synthetic.PICTURE: 427,  # tvmonitor (as in the semseg map)
    synthetic.BED: 18,  # bed
}
"""Synthetic class -> PASCAL-Context 459-class `LabelMap` id; every one keeps its normals in the loader
(`pascal.NORMALS_VALID_CONTEXT_CLASSES`)."""

_VOC_LUT = np.array([VOC_CLASS_OF_SYNTHETIC[c] for c in range(len(synthetic.CLASS_NAMES))], dtype=np.uint8)
_CONTEXT_LUT = np.array([CONTEXT_CLASS_OF_SYNTHETIC[c] for c in range(len(synthetic.CLASS_NAMES))], dtype=np.uint16)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def stand_in_parts(person: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Part masks (PASCAL-Part person part names, non-empty only) of one person mask (H x W bool).

    The synthetic scenes hold no people, so parts are a deterministic stand-in laid on the mask's
    bounding box (rows r and columns c as fractions of its height and width, from the top left; the
    person faces the camera, so its right side is on the image's left):
        r < 1/6 head; 1/6 <= r < 7/12 the arm band: c < 1/4 right arm, c >= 3/4 left arm (upper
        arm for r < 3/8, else lower arm), torso between; r >= 7/12 legs: c < 1/2 right, else left
        (upper leg for r < 19/24, else lower leg).
    """
    rows, cols = np.nonzero(person)
    if rows.size == 0:
        return []
    top, left = rows.min(), cols.min()
    h, w = rows.max() - top + 1, cols.max() - left + 1
    yy, xx = np.indices(person.shape)
    r, c = yy - top, xx - left  # the fraction tests below are exact integer comparisons
    head = 6 * r < h
    band = ~head & (12 * r < 7 * h)
    legs = ~head & ~band
    upper_arm, upper_leg = 8 * r < 3 * h, 24 * r < 19 * h
    right_arm, left_arm, right_leg = 4 * c < w, 4 * c >= 3 * w, 2 * c < w
    regions = {
        "head": head,
        "torso": band & ~right_arm & ~left_arm,
        "ruarm": band & right_arm & upper_arm,
        "rlarm": band & right_arm & ~upper_arm,
        "luarm": band & left_arm & upper_arm,
        "llarm": band & left_arm & ~upper_arm,
        "ruleg": legs & right_leg & upper_leg,
        "rlleg": legs & right_leg & ~upper_leg,
        "luleg": legs & ~right_leg & upper_leg,
        "llleg": legs & ~right_leg & ~upper_leg,
    }
    return [(name, mask) for name, mask in ((n, m & person) for n, m in regions.items()) if mask.any()]


def pascal_objects(voc_semseg: np.ndarray) -> list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """The PASCAL-Part objects of a 21-class map: (VOC class, mask, parts) per 8-connected component
    of each foreground class, in class order then scan order; only persons have parts."""
    objects = []
    for voc in np.unique(voc_semseg):
        if voc == 0 or voc == IGNORE_INDEX:
            continue
        components, count = ndimage.label(voc_semseg == voc, structure=_EIGHT_CONNECTED)
        for k in range(1, count + 1):
            mask = components == k
            parts = stand_in_parts(mask) if voc == pascal.PERSON_CLASS_INDEX else []
            objects.append((int(voc), mask, parts))
    return objects


def parts_target(objects: list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]], size: tuple[int, int]) -> np.ndarray:
    """The 7-class parts map (`pascal.PART_NAMES`, uint8) that `objects` encode by `pascal.HUMAN_PART_MAP`
    (0 off every part)."""
    target = np.zeros(size, dtype=np.uint8)
    for _, _, parts in objects:
        for name, mask in parts:
            target[mask] = pascal.HUMAN_PART_MAP[name]
    return target


def pascal_targets(sample: dict[str, Any]) -> dict[str, Any]:
    """A synthetic sample (`synthetic.generate`) in the PASCAL-Context label spaces.

    semseg: 21 VOC classes by `VOC_CLASS_OF_SYNTHETIC`; labelmap: 459 PASCAL-Context ids by
    `CONTEXT_CLASS_OF_SYNTHETIC`; objects: `pascal_objects` of the semseg map; parts: their
    `parts_target`; saliency, edge and normals: the scene's own.
    """
    semseg = _VOC_LUT[sample["semseg"]]
    objects = pascal_objects(semseg)
    return {
        "semseg": semseg,
        "labelmap": _CONTEXT_LUT[sample["semseg"]],
        "objects": objects,
        "parts": parts_target(objects, semseg.shape),
        "saliency": sample["saliency"],
        "edge": sample["edge"],
        "normals": sample["normals"],
    }


def make_anno(image_id: str, objects: list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> np.ndarray:
    """A PASCAL-Part `anno` struct (1 x 1, fields imname, objects) as `scipy.io.savemat` writes it:
    objects is 1 x N (class, classIndex, mask, parts), parts 1 x M (part_name, mask) or [] when none;
    masks are logical, classIndex a double."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("classIndex", "O"), ("mask", "O"), ("parts", "O")])
    for j, (voc, mask, parts) in enumerate(objects):
        if parts:
            part_array = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for k, (name, part_mask) in enumerate(parts):
                part_array[0, k] = (name, part_mask.astype(bool))
        else:
            part_array = np.zeros((0, 0))
        objs[0, j] = (pascal.SEMSEG_CLASS_NAMES[voc], np.array([[float(voc)]]), mask.astype(bool), part_array)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (image_id, objs)
    return anno


def _write_jpg(path: Path, rgb: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write {path}")


PASCAL_FOLDERS = (
    "JPEGImages", "ImageSets/Context", "semseg/pascal-context", "human_parts", "sal_distill", "normals_distill",
    "edge", "pascal-context/trainval",
)


def write_pascal_layout(
    out: str | Path,
    num: int,
    height: int = 128,
    width: int = 160,
    seed: int = 0,
    val_fraction: float = 0.2,
    progress: bool = True,
) -> list[str]:
    """Write `num` scenes under `out` as PASCAL-Context multi-task (PASCAL-MT, read by
    `mtvision.data.pascal.PascalContext`) does; returns the ids.

    JPEGImages/<id>.jpg (quality 100, no chroma subsampling), ImageSets/Context/{train,val}.txt (the
    last `val_fraction` of the ids are val), semseg/pascal-context/<id>.png (21 VOC classes, see
    `VOC_CLASS_OF_SYNTHETIC`), human_parts/<id>.mat (`anno`, see `make_anno`; person parts are the
    `stand_in_parts` of the person stand-ins, the pillars), sal_distill/<id>.png (0 / 255: the scene's
    furniture mask), normals_distill/<id>.png (round((n + 1) / 2 * 255)), edge/<id>.png (0 / 255: the
    scene's own boundaries, which the loader prefers to edges derived from LabelMap) and
    pascal-context/trainval/<id>.mat (`LabelMap`, uint16, see `CONTEXT_CLASS_OF_SYNTHETIC`; every
    class keeps its normals).  Label ids, parts, saliency and edges read back exactly; normals within
    the 8-bit quantisation (1 / 255); the image within JPEG's loss.
    """
    ids = _check_and_ids(num, seed, val_fraction)
    root = Path(out)
    for sub in PASCAL_FOLDERS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(num), desc="synthetic scenes", unit="scene", disable=not progress):
        sample = generate(seed, index, height, width)
        sid = sample["meta"]["id"]
        target = pascal_targets(sample)
        _write_jpg(root / "JPEGImages" / f"{sid}.jpg", sample["image"])
        _write_png(root / "semseg" / "pascal-context" / f"{sid}.png", target["semseg"])
        scipy.io.savemat(root / "human_parts" / f"{sid}.mat", {"anno": make_anno(sid, target["objects"])})
        _write_png(root / "sal_distill" / f"{sid}.png", (target["saliency"] * 255).astype(np.uint8))
        _write_png(root / "normals_distill" / f"{sid}.png", _normals_png(target["normals"]))
        _write_png(root / "edge" / f"{sid}.png", (target["edge"] * 255).astype(np.uint8))
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{sid}.mat", {"LabelMap": target["labelmap"]})
    _write_splits(root / "ImageSets" / "Context", ids, val_fraction)
    return ids


LAYOUTS = {"nyud": write_nyud_layout, "pascal": write_pascal_layout}
"""Layout name -> writer (same arguments), as `mtv-make-synthetic --layout` names them."""


def preview_grid(seed: int = 0, num: int = 6, height: int = 128, width: int = 160) -> np.ndarray:
    """One row per scene: image | semseg | depth | normals | edge | saliency (H x W x 3 uint8)."""
    rows = []
    for index in range(num):
        sample = generate(seed, index, height, width)
        rows.append(
            [
                sample["image"],
                visualize.colorize_labels(sample["semseg"]),
                visualize.colorize_depth(sample["depth"]),
                visualize.colorize_normals(sample["normals"]),
                visualize.colorize_probability(sample["edge"]),
                visualize.colorize_probability(sample["saliency"]),
            ]
        )
    return visualize.image_grid(rows, titles=list(PREVIEW_COLUMNS))
