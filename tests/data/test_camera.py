"""Camera intrinsics in the sample contract: the datasets' cameras, and each transform's effect on K
against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from mtvision.cv import cv2
from mtvision.data import camera as C
from mtvision.data import transforms as T
from mtvision.data.loader import collate
from mtvision.data.nyud import NYUDv2
from mtvision.data.sample import validate_raw
from mtvision.data.synthetic import SyntheticScenes, generate
from mtvision.errors import DatasetError
from tests.data.conftest import write_npy, write_png

FX, FY, CX, CY = 50.0, 52.0, 14.25, 9.5
H, W = 20, 30


def raw_with_camera() -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "depth": rng.uniform(1, 3, (H, W)).astype(np.float32),
        "meta": {"id": "k", "size": (H, W), "intrinsics": C.intrinsics_matrix(FX, FY, CX, CY)},
    }


def K_of(raw: dict) -> np.ndarray:
    return raw["meta"]["intrinsics"]


def test_crop_shifts_the_principal_point():
    out = T.crop_window(raw_with_camera(), 3, 7, 10, 12)
    np.testing.assert_allclose(K_of(out), C.intrinsics_matrix(FX, FY, CX - 7, CY - 3))
    padded = T.crop_window(raw_with_camera(), -2, -5, 26, 40)  # the image lands at (2, 5) of the window
    np.testing.assert_allclose(K_of(padded), C.intrinsics_matrix(FX, FY, CX + 5, CY + 2))
    np.testing.assert_allclose(K_of(T.pad_to(raw_with_camera(), 32, 32)), C.intrinsics_matrix(FX, FY, CX, CY))


def test_resize_scales_focal_lengths_and_principal_point():
    out = T.resize(raw_with_camera(), 40, 45)  # x 2 down, x 1.5 across
    # c' = s (c + 0.5) - 0.5: 1.5 * 14.75 - 0.5 = 21.625, 2 * 10 - 0.5 = 19.5
    np.testing.assert_allclose(K_of(out), C.intrinsics_matrix(75.0, 104.0, 21.625, 19.5))
    zoom = T.rescale(raw_with_camera(), 0.5)  # 10 x 15
    np.testing.assert_allclose(K_of(zoom), C.intrinsics_matrix(25.0, 26.0, 6.875, 4.5))


def test_flip_mirrors_the_principal_point():
    out = T.hflip(raw_with_camera())
    np.testing.assert_allclose(K_of(out), C.intrinsics_matrix(FX, FY, W - 1 - CX, CY))  # 14.75
    np.testing.assert_allclose(K_of(T.hflip(out)), C.intrinsics_matrix(FX, FY, CX, CY))


def test_rotation_moves_the_principal_point_with_the_pixels():
    raw = raw_with_camera()
    raw["meta"]["intrinsics"] = C.intrinsics_matrix(FX, FX, 3.0, 4.0)
    out = T.rotate(raw, 90.0)
    # 90 degrees counter-clockwise about (15, 10) (OpenCV's image axes, y down): (x, y) -> (15 + (y - 10), 10 - (x - 15))
    np.testing.assert_allclose(K_of(out), C.intrinsics_matrix(FX, FX, 15 + (4 - 10), 10 - (3 - 15)), atol=1e-9)
    matrix = cv2.getRotationMatrix2D((W / 2, H / 2), 90.0, 1.0)
    np.testing.assert_allclose(matrix @ np.array([3.0, 4.0, 1.0]), [9.0, 22.0], atol=1e-9)


def test_a_pixel_still_sees_the_same_ray_after_a_crop_and_a_flip():
    raw = raw_with_camera()
    K = K_of(raw)
    out = T.hflip(T.crop_window(raw, 2, 3, 12, 16))
    K2 = K_of(out)
    # output pixel (u, v) is input pixel (3 + 15 - u, 2 + v); its ray has the x direction mirrored
    u, v = 4.0, 7.0
    ray_in = np.linalg.solve(K, [3 + 15 - u, 2 + v, 1.0])
    ray_out = np.linalg.solve(K2, [u, v, 1.0])
    np.testing.assert_allclose(ray_out, ray_in * [-1, 1, 1], atol=1e-12)


def test_photometric_and_the_pipeline_carry_the_camera_into_batches():
    raw = raw_with_camera()
    tf = T.train_transforms(16, 24, scale_range=(0.7, 1.3), seed=0)
    samples = [tf(raw_with_camera()) for _ in range(3)]
    batch = collate(samples)
    K = C.batch_intrinsics(batch["meta"])
    assert K.shape == (3, 3, 3) and K.dtype.is_floating_point
    assert (K[:, 0, 0] > 0).all() and not np.allclose(K[0].numpy(), K_of(raw))  # scaled and cropped
    assert C.batch_intrinsics([{"id": "x"}]) is None


def test_bad_intrinsics_are_rejected():
    raw = raw_with_camera()
    raw["meta"]["intrinsics"] = np.eye(2)
    with pytest.raises(DatasetError, match="3 x 3"):
        validate_raw(raw)
    raw["meta"]["intrinsics"] = C.intrinsics_matrix(-1.0, 1.0, 0.0, 0.0)
    with pytest.raises(DatasetError, match="fx, fy > 0"):
        validate_raw(raw)


# ---------------------------------------------------------------- the datasets' cameras
def test_nyud_cameras():
    K = C.nyud_intrinsics((480, 640))
    np.testing.assert_allclose(K, C.intrinsics_matrix(518.857901, 519.469611, 325.582449, 253.736166))
    np.testing.assert_allclose(C.nyud_intrinsics((425, 560)), C.intrinsics_matrix(518.857901, 519.469611, 285.582449, 208.736166))
    assert C.nyud_intrinsics((6, 8)) is None


def test_the_nyud_loader_attaches_the_kinect_camera(tmp_path):
    root = tmp_path / "NYUDv2"
    rng = np.random.default_rng(0)
    write_png(root / "images" / "0001.png", rng.integers(0, 256, (425, 560, 3), dtype=np.uint8))
    write_npy(root / "depth" / "0001.npy", np.ones((425, 560), np.float32))
    for split in ("train", "val"):
        (root / "gt_sets").mkdir(parents=True, exist_ok=True)
        (root / "gt_sets" / f"{split}.txt").write_text("0001\n")
    raw = NYUDv2(root, "train", tasks=["depth"]).load_raw(0)
    np.testing.assert_allclose(K_of(raw), C.nyud_intrinsics((425, 560)))


def test_synthetic_intrinsics_are_the_ray_casters():
    raw = generate(0, 5, 64, 80)
    K = K_of(raw)
    assert K[0, 2] == pytest.approx(39.5) and K[1, 2] == pytest.approx(31.5) and K[0, 0] == K[1, 1]
    # back-projecting the depth with K gives surfaces whose normals are the rendered ones
    depth, normals = raw["depth"], raw["normals"]
    vs, us = np.mgrid[0:64, 0:80].astype(np.float64)
    points = np.stack([(us - K[0, 2]) / K[0, 0], (vs - K[1, 2]) / K[1, 1], np.ones_like(us)], -1) * depth[..., None]

    def angles(pts: np.ndarray) -> np.ndarray:
        n = np.cross(pts[1:-1, 2:] - pts[1:-1, :-2], pts[2:, 1:-1] - pts[:-2, 1:-1])
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        cos = np.abs((n * normals[1:-1, 1:-1]).sum(-1))
        flat = raw["edge"][1:-1, 1:-1] == 0
        return np.degrees(np.arccos(np.clip(cos[flat], 0, 1)))

    assert np.median(angles(points)) < 0.01  # exact up to float rounding
    wrong = points * np.array([1.1, 1.1, 1.0])  # a focal length 10% too short
    assert np.median(angles(wrong)) > 1.0
    sample = SyntheticScenes(1, 32, 40, seed=1, tasks=["depth"])[0]
    assert sample["meta"]["intrinsics"].shape == (3, 3)


def test_an_assumed_camera_from_a_field_of_view():
    K = C.assumed_intrinsics((300, 400), 90.0)  # tan(45°) = 1: the focal length is half the width
    np.testing.assert_allclose(K, [[200.0, 0.0, 200.0], [0.0, 200.0, 150.0], [0.0, 0.0, 1.0]], atol=1e-9)
    K = C.assumed_intrinsics((100, 100), 60.0)
    assert K[0, 0] == pytest.approx(50.0 / np.tan(np.radians(30.0))) and K[0, 0] == K[1, 1]
    for bad in (0.0, 180.0, -5.0):
        with pytest.raises(ValueError, match="field of view"):
            C.assumed_intrinsics((10, 10), bad)
