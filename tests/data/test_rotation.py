"""Random rotation (the MTI-Net / PAD-Net releases' ScaleNRotate angle): every target moves with the
image by the same nearest-pixel map, padding outside, normals turned in-plane, depth unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from mtvision.config import ConfigError, DataConfig
from mtvision.data import transforms as T

H = W = 8  # even: rotations by multiples of 90 degrees about (w/2, h/2) map pixels onto pixels


def make_raw(h: int = H, w: int = W) -> dict:
    y, x = np.mgrid[0:h, 0:w]
    normals = np.stack([np.full((h, w), 0.6), np.full((h, w), 0.0), np.full((h, w), 0.8)], -1).astype(np.float32)
    normals[2, 3] = 0  # an invalid pixel (x 3, y 2)
    return {
        "image": np.stack([8 * x, 8 * y, np.full_like(x, 100)], axis=-1).astype(np.uint8),
        "semseg": ((x + 3 * y) % 250).astype(np.uint8),
        "depth": (1 + x + 100 * y).astype(np.float32),
        "normals": normals,
        "meta": {"id": "toy", "size": (h, w)},
    }


def _source(out: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source x, source y, inside mask) decoded from the rotated depth (0 = padding)."""
    depth = out["depth"]
    inside = depth > 0
    code = np.where(inside, depth - 1, 0).astype(np.int64)
    return code % 100, code // 100, inside


def test_zero_degrees_is_the_identity():
    raw = make_raw()
    out = T.rotate(raw, 0.0)
    for key in ("image", "semseg", "depth", "normals"):
        np.testing.assert_array_equal(out[key], raw[key])


def test_half_turn_is_the_point_reflection_about_the_centre_with_padding():
    raw = make_raw()
    out = T.rotate(raw, 180.0, image_fill=(7, 7, 7))
    # about (w/2, h/2) = (4, 4): output (x, y) shows source (8 - x, 8 - y); row 0 and column 0 are outside
    for key in ("semseg", "depth"):
        np.testing.assert_array_equal(out[key][1:, 1:], raw[key][::-1, ::-1][:-1, :-1])
    np.testing.assert_array_equal(out["image"][1:, 1:], raw["image"][::-1, ::-1][:-1, :-1])
    assert (out["semseg"][0] == 255).all() and (out["depth"][:, 0] == 0).all()  # each task's pad value
    assert (out["image"][0] == 7).all()
    valid = np.ones((H, W), bool)
    valid[0], valid[:, 0], valid[8 - 2, 8 - 3] = False, False, False
    np.testing.assert_allclose(out["normals"][valid], np.tile([-0.6, 0.0, 0.8], (int(valid.sum()), 1)), atol=1e-6)  # turned
    assert (out["normals"][~valid] == 0).all()  # padding, and the invalid pixel stays zero


def test_quarter_turn_keeps_every_target_on_the_image_pixel_and_turns_the_normals():
    raw = make_raw()
    out = T.rotate(raw, 90.0)
    sx, sy, inside = _source(out)
    assert inside.sum() > 0.8 * H * W
    np.testing.assert_array_equal(out["semseg"][inside], ((sx + 3 * sy) % 250)[inside])
    np.testing.assert_array_equal(out["image"][..., 0][inside], (8 * sx)[inside])  # the image moved identically
    np.testing.assert_array_equal(out["image"][..., 1][inside], (8 * sy)[inside])
    # counter-clockwise on screen (OpenCV's positive angle, y down): the right side goes to the top,
    # output (x, y) shows source (8 - y, x) about the centre (4, 4)
    y, x = np.mgrid[0:H, 0:W]
    np.testing.assert_array_equal(sx[inside], (8 - y)[inside])
    np.testing.assert_array_equal(sy[inside], x[inside])
    invalid = inside & (sx == 3) & (sy == 2)  # the source's invalid normal moved too, still zero
    assert invalid.sum() == 1 and (out["normals"][invalid] == 0).all()
    valid = inside & (np.abs(out["normals"]).sum(-1) > 0)
    np.testing.assert_allclose(out["normals"][valid], np.tile([0.0, -0.6, 0.8], (int(valid.sum()), 1)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["normals"][valid], axis=-1), 1.0, rtol=1e-6)


def test_random_rotation_draws_within_the_range_and_pipelines_take_it():
    raw = make_raw(9, 13)
    a = T.RandomRotation(20, seed=3)
    b = T.RandomRotation(20, seed=3)
    np.testing.assert_array_equal(a(raw)["depth"], b(raw)["depth"])
    angles = []
    original = T.rotate
    try:
        T.rotate = lambda r, d, f=0: angles.append(d) or original(r, d, f)
        for _ in range(50):
            a(raw)
    finally:
        T.rotate = original
    assert max(abs(v) for v in angles) <= 20 and np.std(angles) > 5
    with pytest.raises(ValueError, match="degrees must be in"):
        T.RandomRotation(200)
    assert "RandomRotation(20.0" in repr(T.train_transforms(8, 8, rotation=20))
    assert "RandomRotation" not in repr(T.train_transforms(8, 8))


def test_data_config_rotation_option():
    assert DataConfig().rotation == 0.0
    DataConfig(rotation=20).validate()
    with pytest.raises(ConfigError, match="data.rotation"):
        DataConfig(rotation=-5).validate()
