"""Builders of tiny dataset trees in the exact on-disk formats of NYUD-v2 and PASCAL-Context."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import h5py
import numpy as np
import pytest
import scipy.io

H, W = 6, 8


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write an H x W or H x W x 3 (RGB) array as PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[..., ::-1] if array.ndim == 3 else array
    assert cv2.imwrite(str(path), np.ascontiguousarray(data))
    return path


def write_jpg(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB array as a quality-100 JPEG without chroma subsampling (near-lossless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]), params)
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def write_mat73(path: Path, variables: dict[str, np.ndarray]) -> Path:
    """A MATLAB v7.3 file: HDF5 after a 512-byte user block; arrays given in MATLAB order are stored reversed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as handle:
        for key, value in variables.items():
            handle.create_dataset(key, data=np.asarray(value).T)
    with open(path, "r+b") as raw:
        raw.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(116))
    return path


def make_anno(objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> np.ndarray:
    """A PASCAL-Part `anno` struct: objects as (class name, class index, mask, [(part name, mask), ...])."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("classIndex", "O"), ("mask", "O"), ("parts", "O")])
    for j, (name, index, mask, parts) in enumerate(objects):
        if parts:
            arr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for k, (part_name, part_mask) in enumerate(parts):
                arr[0, k] = (part_name, part_mask.astype(np.uint8))
        else:
            arr = np.zeros((0, 0))
        objs[0, j] = (name, np.array([[index]], dtype=np.uint8), mask.astype(np.uint8), arr)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("img", objs)
    return anno


def write_anno(path: Path, objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"anno": make_anno(objects)})
    return path


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


# ------------------------------------------------------------------ NYUD
def nyud_semseg_stored() -> np.ndarray:
    seg = np.zeros((H, W), dtype=np.uint8)
    seg[0, 1], seg[0, 2], seg[0, 3], seg[1, :] = 5, 40, 1, 12
    return seg


def nyud_normals_stored() -> np.ndarray:
    normals = np.full((H, W, 3), 200, dtype=np.uint8)
    normals[0, 0] = (255, 0, 128)
    normals[0, 1] = (0, 0, 0)  # invalid
    normals[0, 2] = (0, 255, 1)
    return normals


def build_nyud(root: Path, release: str = "atrc", train: tuple[str, ...] = ("0001", "0002"),
               val: tuple[str, ...] = ("0003",)) -> dict[str, dict[str, np.ndarray]]:
    """Write a NYUD tree ('atrc' or 'mtinet'); returns the stored arrays per id."""
    stored: dict[str, dict[str, np.ndarray]] = {}
    for seed, sample_id in enumerate(train + val):
        image = _image(seed)
        depth = np.linspace(0.5, 4.0, H * W, dtype=np.float32).reshape(H, W) + seed
        depth[2, 3] = 0.0
        edge = np.zeros((H, W), dtype=np.uint8)
        edge[:, 4] = 255
        if release == "atrc":
            write_png(root / "images" / f"{sample_id}.png", image)
            write_png(root / "normals" / f"{sample_id}.png", nyud_normals_stored())
            write_png(root / "edge" / f"{sample_id}.png", edge)
            normals, edge_file = nyud_normals_stored(), edge
        else:
            write_jpg(root / "images" / f"{sample_id}.jpg", image)
            normals = np.zeros((H, W, 3), dtype=np.float32)
            normals[..., 2] = -1.0
            normals[0, 0] = (0.6, 0.0, -0.8)
            write_npy(root / "normals" / f"{sample_id}.npy", normals)
            edge_file = (edge > 0).astype(np.float32)
            write_npy(root / "edge" / f"{sample_id}.npy", edge_file)
        write_png(root / "segmentation" / f"{sample_id}.png", nyud_semseg_stored())
        write_npy(root / "depth" / f"{sample_id}.npy", depth)
        stored[sample_id] = {"image": image, "depth": depth, "normals": normals, "edge": edge_file}
    (root / "gt_sets").mkdir(parents=True, exist_ok=True)
    (root / "gt_sets" / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (root / "gt_sets" / "val.txt").write_text("\n".join(val) + "\n\n")
    return stored


@pytest.fixture
def nyud_tree(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """Factory: nyud_tree(release='atrc'|'mtinet') -> (root, stored arrays per id)."""

    def make(release: str = "atrc") -> tuple[Path, dict[str, Any]]:
        root = tmp_path / f"NYUD_{release}"
        return root, build_nyud(root, release)

    return make


# ------------------------------------------------------------------ PASCAL-Context
WALL, PERSON_CTX, SKY = 440, 284, 360  # LabelMap ids: wall and person are NYU classes, sky is not


def pascal_labelmap() -> np.ndarray:
    labels = np.full((H, W), WALL, dtype=np.uint16)
    labels[:, 4:] = PERSON_CTX
    labels[0, 5:] = SKY
    return labels


def person_objects() -> list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """Two persons, a dog with a 'head' part and a part-less person."""
    def box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        mask = np.zeros((H, W), dtype=bool)
        mask[r0:r1, c0:c1] = True
        return mask

    person_a = ("person", 15, box(0, 6, 0, 4), [
        ("head", box(0, 1, 0, 2)), ("hair", box(0, 1, 2, 3)), ("neck", box(1, 2, 0, 1)), ("torso", box(1, 3, 1, 3)),
        ("luarm", box(3, 4, 0, 1)), ("rlarm", box(3, 4, 1, 2)), ("rhand", box(3, 4, 2, 3)), ("ruleg", box(4, 5, 0, 2)),
        ("llleg", box(5, 6, 0, 1)), ("lfoot", box(5, 6, 1, 2)),
    ])
    dog = ("dog", 12, box(0, 2, 5, 8), [("head", box(0, 2, 5, 8))])
    person_b = ("person", 15, box(2, 6, 4, 8), [("reye", box(2, 3, 4, 5)), ("torso", box(3, 4, 4, 6))])
    person_no_parts = ("person", 15, box(5, 6, 6, 8), [])
    return [person_a, dog, person_b, person_no_parts]


def expected_parts() -> np.ndarray:
    parts = np.zeros((H, W), dtype=np.uint8)
    parts[0, 0:2], parts[0, 2], parts[1, 0], parts[1:3, 1:3] = 1, 1, 2, 2
    parts[3, 0], parts[3, 1], parts[3, 2], parts[4, 0:2], parts[5, 0], parts[5, 1] = 3, 4, 4, 5, 6, 6
    parts[2, 4], parts[3, 4:6] = 1, 2
    return parts


def build_pascal(root: Path, train: tuple[str, ...] = ("2008_000001", "2008_000002"),
                 val: tuple[str, ...] = ("2008_000003",), no_person: tuple[str, ...] = ("2008_000002",)) -> dict:
    """Write a PASCAL-MT tree; ids in `no_person` carry only a dog. Returns stored arrays per id."""
    stored: dict[str, dict[str, np.ndarray]] = {}
    semseg = np.zeros((H, W), dtype=np.uint8)
    semseg[0, :4] = (0, 7, 20, 255)
    semseg[1:, 4:] = 15
    sal = np.zeros((H, W), dtype=np.uint8)
    sal[0, :4] = (200, 100, 128, 127)
    normals = np.full((H, W, 3), 64, dtype=np.uint8)
    normals[1, 0] = (255, 0, 128)
    normals[1, 5] = (10, 20, 30)
    for seed, sample_id in enumerate(train + val):
        image = _image(seed)
        write_jpg(root / "JPEGImages" / f"{sample_id}.jpg", image)
        write_png(root / "semseg" / "pascal-context" / f"{sample_id}.png", semseg)
        objects = person_objects()
        if sample_id in no_person:
            objects = [objects[1]]
        write_anno(root / "human_parts" / f"{sample_id}.mat", objects)
        write_png(root / "normals_distill" / f"{sample_id}.png", normals)
        write_png(root / "sal_distill" / f"{sample_id}.png", sal)
        mat = root / "pascal-context" / "trainval" / f"{sample_id}.mat"
        mat.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(mat, {"LabelMap": pascal_labelmap()})
        stored[sample_id] = {"image": image, "semseg": semseg, "saliency": sal, "normals": normals}
    splits = root / "ImageSets" / "Context"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "train.txt").write_text("\n".join(train) + "\n")
    (splits / "val.txt").write_text("\n".join(val) + "\n")
    return stored


@pytest.fixture
def pascal_tree(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """Factory: pascal_tree() -> (root, stored arrays per id)."""

    def make() -> tuple[Path, dict[str, Any]]:
        root = tmp_path / "PASCAL_MT"
        return root, build_pascal(root)

    return make


@pytest.fixture
def builders() -> SimpleNamespace:
    """The writers and expected-value helpers of this file, for tests (conftest is not importable)."""
    return SimpleNamespace(
        H=H, W=W, WALL=WALL, PERSON_CTX=PERSON_CTX, SKY=SKY,
        write_png=write_png, write_jpg=write_jpg, write_npy=write_npy, write_mat73=write_mat73,
        write_anno=write_anno, make_anno=make_anno, person_objects=person_objects, expected_parts=expected_parts,
        pascal_labelmap=pascal_labelmap, nyud_semseg_stored=nyud_semseg_stored,
        nyud_normals_stored=nyud_normals_stored,
    )
