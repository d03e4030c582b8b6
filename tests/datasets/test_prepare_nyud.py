"""Tests of datasets/prepare_nyud.py on a tiny synthetic labeled set (MATLAB v7.3 via h5py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import scipy.io

from mtvision.data.nyud import NYUDv2
from mtvision.data.pascal import label_map_edges
from mtvision.errors import DatasetError

_SCRIPT = Path(__file__).resolve().parents[2] / "datasets" / "prepare_nyud.py"
_spec = importlib.util.spec_from_file_location("prepare_nyud", _SCRIPT)
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)

H, W, N = 12, 16, 3


def _write_mat73(path: Path, variables: dict[str, np.ndarray]) -> None:
    """MATLAB-ordered arrays -> v7.3 file (HDF5 after a 512-byte user block, axes reversed as MATLAB does)."""
    with h5py.File(path, "w", userblock_size=512) as handle:
        for key, value in variables.items():
            handle.create_dataset(key, data=np.asarray(value).T)
    with open(path, "r+b") as raw:
        raw.write(b"MATLAB 7.3 MAT-file".ljust(116))


@pytest.fixture
def official(tmp_path):
    """A 3-frame labeled set, its splits (train 1, 3; test 2) and a 894 -> 40 class map."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(H, W, 3, N), dtype=np.uint8)  # MATLAB: H x W x 3 x N
    depths = np.stack([np.full((H, W), 2.0 + k, np.float32) for k in range(N)], axis=-1)
    depths[4, 5, 1] = 0.0  # a hole in frame 2
    labels = np.zeros((H, W, N), np.uint16)
    labels[:, W // 2 :, :] = 894
    labels[:, : W // 2, 0] = 41
    labels[0, 0, 2] = 0
    map_class = np.array([(k % 40) + 1 for k in range(1, 895)], dtype=np.float64)[None, :]  # 1 x 894
    _write_mat73(tmp_path / "labeled.mat", {"images": images, "depths": depths, "labels": labels})
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2]])})
    scipy.io.savemat(tmp_path / "map.mat", {"mapClass": map_class})
    return tmp_path, images, depths, labels


def test_convert_writes_every_value(official):
    root, images, depths, labels = official
    out = root / "NYUDv2"
    assert prep.main(["--labeled", str(root / "labeled.mat"), "--splits", str(root / "splits.mat"),
                      "--mapping", str(root / "map.mat"), "--out", str(out)]) == 0
    assert (out / "gt_sets" / "train.txt").read_text() == "0001\n0003\n"
    assert (out / "gt_sets" / "val.txt").read_text() == "0002\n"
    for k in range(N):
        name = f"{k + 1:04d}"
        image = cv2.imread(str(out / "images" / f"{name}.png"))[..., ::-1]
        np.testing.assert_array_equal(image, images[..., k])
        np.testing.assert_array_equal(np.load(out / "depth" / f"{name}.npy"), depths[..., k])
        seg = cv2.imread(str(out / "segmentation" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        # 894 -> (894 % 40) + 1 = 15; 41 -> 2; 0 stays 0 (unlabeled)
        expected = np.where(labels[..., k] == 0, 0, labels[..., k] % 40 + 1).astype(np.uint8)
        np.testing.assert_array_equal(seg, expected)
        edge = cv2.imread(str(out / "edge" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(edge, (label_map_edges(expected) * 255).astype(np.uint8))
    assert set(np.unique(seg)) == {0, 15}  # frame 3: unlabeled left half, 894 -> 15 on the right
    edge1 = cv2.imread(str(out / "edge" / "0001.png"), cv2.IMREAD_UNCHANGED)
    assert edge1[1:, W // 2 - 1].tolist() == [255] * (H - 1) and edge1.sum() == 255 * (H - 1)
    # a fronto-parallel plane faces the camera: n = (0, 0, -1) -> stored (128, 128, 0)
    normals = cv2.imread(str(out / "normals" / "0001.png"))[..., ::-1]
    assert (normals == np.array([128, 128, 0], np.uint8)).all()
    # frame 2: the hole and its 4 neighbours are invalid (stored 0), everything else valid
    normals2 = cv2.imread(str(out / "normals" / "0002.png"))[..., ::-1]
    invalid = (normals2 == 0).all(axis=-1)
    assert sorted(zip(*np.nonzero(invalid))) == [(3, 5), (4, 4), (4, 5), (4, 6), (5, 5)]
    # the loader reads the result back with the documented decoding
    ds = NYUDv2(out, split="val")
    assert ds.release.name == "ATRC/InvPT"
    raw = ds.load_raw(0)
    np.testing.assert_allclose(raw["normals"][0, 0], [2 * 128 / 255 - 1, 2 * 128 / 255 - 1, -1.0], atol=1e-7)
    np.testing.assert_array_equal(raw["normals"][4, 5], 0.0)
    np.testing.assert_array_equal(raw["semseg"][:, W // 2 :], 14)


def test_crop_takes_the_window_and_shifts_the_principal_point(official, monkeypatch):
    root, images, depths, _ = official
    monkeypatch.setattr(prep, "CROP_ROWS", (2, 10))
    monkeypatch.setattr(prep, "CROP_COLS", (3, 15))
    out = root / "cropped"
    prep.convert(root / "labeled.mat", root / "splits.mat", root / "map.mat", out, crop=True)
    image = cv2.imread(str(out / "images" / "0002.png"))[..., ::-1]
    np.testing.assert_array_equal(image, images[2:10, 3:15, :, 1])
    np.testing.assert_array_equal(np.load(out / "depth" / "0002.npy"), depths[2:10, 3:15, 1])


def test_depth_to_normals_recovers_a_tilted_plane():
    fx, fy, cx, cy = 10.0, 12.0, 7.5, 5.5
    normal = np.array([0.3, -0.2, -1.0]) / np.linalg.norm([0.3, -0.2, -1.0])
    offset = -2.0  # plane n . P = offset, in front of the camera
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1)
    depth = offset / (rays @ normal)
    out = prep.depth_to_normals(depth, fx, fy, cx, cy)
    np.testing.assert_allclose(out, np.broadcast_to(normal, out.shape), atol=1e-5)
    # a ceiling (plane Y = -1, above the camera; y points down) must face down toward the camera: (0, 1, 0)
    cy_low = 20.0
    ceiling = -fy / (v - cy_low)
    expected = np.broadcast_to([0.0, 1.0, 0.0], out.shape)
    np.testing.assert_allclose(prep.depth_to_normals(ceiling, fx, fy, cx, cy_low), expected, atol=1e-6)


def test_encode_normals_and_map_labels():
    stored = prep.encode_normals(np.array([[[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]], np.float32))
    np.testing.assert_array_equal(stored, [[[255, 0, 128], [0, 0, 0]]])
    table = np.arange(1, 895) % 40 + 1
    np.testing.assert_array_equal(prep.map_labels(np.array([[0, 1, 40, 894]]), table), [[0, 2, 1, 15]])
    with pytest.raises(DatasetError, match="outside the class map"):
        prep.map_labels(np.array([[895]]), table)


def test_bad_inputs_are_reported(official):
    root, *_ = official
    scipy.io.savemat(root / "bad_splits.mat", {"trainNdxs": np.array([[1], [9]]), "testNdxs": np.array([[2]])})
    with pytest.raises(DatasetError, match=r"bad_splits.mat: trainNdxs must hold 1-based frame numbers in 1..3"):
        prep.convert(root / "labeled.mat", root / "bad_splits.mat", root / "map.mat", root / "o1")
    with pytest.raises(DatasetError, match=r"map.mat: missing variable.*trainNdxs"):
        prep.convert(root / "labeled.mat", root / "map.mat", root / "map.mat", root / "o2")
    assert prep.main(["--labeled", str(root / "splits.mat"), "--splits", str(root / "splits.mat"),
                      "--mapping", str(root / "map.mat"), "--out", str(root / "o3")]) == 1
