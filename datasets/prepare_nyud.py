"""Convert the official NYU Depth v2 labeled set into the ATRC/InvPT NYUD-v2 layout read by `mtvision.data.nyud`.

Inputs: `nyu_depth_v2_labeled.mat` (MATLAB v7.3), the 795/654 split file `splits.mat` (trainNdxs, testNdxs,
1-based) and the NYU40 class map `classMapping40.mat` (mapClass: 894 -> 1..40).  Output under --out:
images/<id>.png, segmentation/<id>.png (NYU40 class, 0 = unlabeled), depth/<id>.npy (metres),
normals/<id>.png (from depth, see README), edge/<id>.png (0/255), gt_sets/{train,val}.txt.
Ids are the 1-based frame numbers of the labeled set, zero-padded to four digits.

    python datasets/prepare_nyud.py --labeled nyu_depth_v2_labeled.mat --splits splits.mat \
        --mapping classMapping40.mat --out data/NYUDv2 [--crop]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mtvision.data.io import open_mat73, read_mat
from mtvision.data.pascal import label_map_edges
from mtvision.errors import DatasetError

# RGB intrinsics of the NYU Depth v2 Kinect, 640 x 480 frames (official toolbox camera_params.m)
FX, FY, CX, CY = 518.857901, 519.469611, 325.582449, 253.736166
# --crop: a 425 x 560 window inside the white border, within the usual Eigen evaluation crop [45:471, 41:601]
CROP_ROWS = (45, 470)
CROP_COLS = (41, 601)
NUM_CLASSES = 40


def frame(handle, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame `index` (0-based) of the labeled set as (RGB uint8 H x W x 3, depth float32 H x W, labels H x W)."""
    image = np.asarray(handle["images"][index]).transpose(2, 1, 0)  # h5py gives (3, W, H)
    depth = np.asarray(handle["depths"][index], dtype=np.float32).T
    labels = np.asarray(handle["labels"][index]).T
    return np.ascontiguousarray(image.astype(np.uint8)), np.ascontiguousarray(depth), np.ascontiguousarray(labels)


def map_labels(labels: np.ndarray, map_class: np.ndarray) -> np.ndarray:
    """894-class labels (0 = unlabeled) -> uint8 NYU40 labels 1..40 (0 = unlabeled)."""
    table = np.concatenate([[0], np.asarray(map_class).ravel()]).astype(np.int64)
    labels = np.asarray(labels).astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(table):
        raise DatasetError(f"label {int(labels.max())} is outside the class map (894 classes, got {len(table) - 1})")
    if table.min() < 0 or table.max() > NUM_CLASSES:
        raise DatasetError(f"class map values must be in 0..{NUM_CLASSES}, got {int(table.min())}..{int(table.max())}")
    return table[labels].astype(np.uint8)


def depth_to_normals(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Unit normals H x W x 3 (camera frame: x right, y down, z forward; facing the camera) from metric depth.

    The normal is the cross product of the central differences of the back-projected points along the image
    axes; pixels where the depth or a neighbour used is 0 get the zero vector.
    """
    depth = np.asarray(depth, dtype=np.float64)
    height, width = depth.shape
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    points = np.stack([(u - cx) * depth / fx, (v - cy) * depth / fy, depth], axis=-1)
    d_u = np.gradient(points, axis=1)
    d_v = np.gradient(points, axis=0)
    normals = np.cross(d_u, d_v)
    flip = (normals * points).sum(axis=-1) > 0
    normals[flip] *= -1.0
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    valid = depth > 0
    padded = np.pad(valid, 1, mode="edge")
    valid &= padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    valid &= norm[..., 0] > 1e-12
    out = np.where(valid[..., None], normals / np.maximum(norm, 1e-12), 0.0)
    return out.astype(np.float32)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals -> uint8 RGB round((n + 1) / 2 * 255); zero vectors (invalid) -> 0."""
    stored = np.clip(np.rint((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)
    stored[(normals == 0).all(axis=-1)] = 0
    return stored


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = np.ascontiguousarray(array[..., ::-1])  # OpenCV writes BGR
    if not cv2.imwrite(str(path), array):
        raise DatasetError(f"cannot write {path}")


def _split_indices(splits: dict[str, np.ndarray], key: str, count: int, path: Path) -> list[int]:
    values = np.asarray(splits[key]).ravel()
    if values.size == 0 or values.min() < 1 or values.max() > count or not np.allclose(values, np.round(values)):
        raise DatasetError(f"{path}: {key} must hold 1-based frame numbers in 1..{count}")
    return [int(x) for x in values]


def convert(
    labeled: Path, splits_file: Path, mapping_file: Path, out: Path, crop: bool = False, normals: bool = True
) -> dict[str, list[str]]:
    """Write the ATRC layout under `out`; returns the ids of each split."""
    map_class = read_mat(mapping_file, keys=("mapClass",))["mapClass"]
    splits = read_mat(splits_file, keys=("trainNdxs", "testNdxs"))
    with open_mat73(labeled) as handle:
        for key in ("images", "depths", "labels"):
            if key not in handle:
                raise DatasetError(f"{labeled}: missing variable {key!r} (found: {sorted(handle.keys())})")
        count = handle["images"].shape[0]
        train = _split_indices(splits, "trainNdxs", count, splits_file)
        val = _split_indices(splits, "testNdxs", count, splits_file)
        if set(train) & set(val):
            raise DatasetError(f"{splits_file}: trainNdxs and testNdxs overlap")
        for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        rows, cols = (CROP_ROWS, CROP_COLS) if crop else ((0, None), (0, None))
        cx, cy = CX - cols[0], CY - rows[0]
        for number in tqdm(sorted(set(train) | set(val)), desc="NYUD-v2 frames", unit="frame"):
            image, depth, labels = frame(handle, number - 1)
            window = (slice(rows[0], rows[1]), slice(cols[0], cols[1]))
            image, depth, labels = image[window], depth[window], labels[window]
            name = f"{number:04d}"
            seg = map_labels(labels, map_class)
            _write_png(out / "images" / f"{name}.png", image)
            _write_png(out / "segmentation" / f"{name}.png", seg)
            np.save(out / "depth" / f"{name}.npy", depth.astype(np.float32), allow_pickle=False)
            _write_png(out / "edge" / f"{name}.png", (label_map_edges(seg) * 255).astype(np.uint8))
            if normals:
                _write_png(out / "normals" / f"{name}.png", encode_normals(depth_to_normals(depth, FX, FY, cx, cy)))
    ids = {"train": [f"{n:04d}" for n in train], "val": [f"{n:04d}" for n in val]}
    for split, names in ids.items():
        (out / "gt_sets" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labeled", type=Path, required=True, help="nyu_depth_v2_labeled.mat (v7.3)")
    parser.add_argument("--splits", type=Path, required=True, help="splits.mat with trainNdxs/testNdxs")
    parser.add_argument("--mapping", type=Path, required=True, help="classMapping40.mat with mapClass")
    parser.add_argument("--out", type=Path, required=True, help="output root (the NYUDv2 folder)")
    parser.add_argument("--crop", action="store_true", help="crop the white border to 425 x 560 (ATRC size)")
    parser.add_argument("--no-normals", action="store_true", help="skip computing normals from depth")
    args = parser.parse_args(argv)
    try:
        ids = convert(args.labeled, args.splits, args.mapping, args.out, crop=args.crop, normals=not args.no_normals)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(ids['train'])} train and {len(ids['val'])} val frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
