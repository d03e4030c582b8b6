"""Joint transforms keep every target aligned with the image and apply the per-task rules.

The source sample encodes its pixel coordinates in every map: depth = 1 + x + 100 y (so a pixel's
source (x, y) is decoded from depth times the zoom factor), image channels 0/1 = 8 x / 8 y (so the
image gives the continuous source position it samples), and every other target is a known
function of (x, y).  `check_aligned` decodes each output pixel and checks all maps against it.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mtvision.data import transforms as T
from mtvision.data.sample import IMAGENET_MEAN, IMAGENET_STD, to_sample
from mtvision.errors import DatasetError, UnknownNameError

H, W = 20, 30


def semseg_of(x, y):
    return (x + 3 * y) % 250


def parts_of(x, y):
    return (x * y) % 7


def edge_of(x, y):
    return ((x + y) % 2).astype(np.float32)


def saliency_of(x, y):
    return (x % 3 == 0).astype(np.float32)


def normals_of(x, y):
    v = np.stack([x - 14.5, y - 9.5, np.full_like(x, 7.0, dtype=np.float64)], axis=-1)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def make_raw(h: int = H, w: int = W) -> dict:
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([8 * x, 8 * y, np.full_like(x, 100)], axis=-1).astype(np.uint8)
    return {
        "image": image,
        "semseg": semseg_of(x, y).astype(np.uint8),
        "parts": parts_of(x, y).astype(np.uint8),
        "depth": (1 + x + 100 * y).astype(np.float32),
        "normals": normals_of(x, y),
        "edge": edge_of(x, y),
        "saliency": saliency_of(x, y),
        "meta": {"id": "toy", "size": (h, w)},
    }


def check_aligned(out: dict, factor: float = 1.0, flipped: bool = False, image_fill=(0, 0, 0)) -> np.ndarray:
    """Assert every map of `out` shows the source pixel its depth encodes; return the valid mask."""
    depth = out["depth"]
    valid = depth > 0
    key = np.rint(depth[valid].astype(np.float64) * factor).astype(np.int64) - 1
    x, y = key % 100, key // 100
    assert (0 <= x).all() and (x < W).all() and (0 <= y).all() and (y < H).all()
    # depth is exactly the source depth divided by the zoom factor
    np.testing.assert_array_equal(depth[valid], (1 + x + 100 * y).astype(np.float32) / np.float32(factor))
    # the image samples a continuous source position within half a pixel of the targets' pixel
    img = out["image"].astype(np.float64)
    assert np.abs(img[..., 0][valid] / 8 - x).max() <= 0.5 + 1 / 16 + 1e-9
    assert np.abs(img[..., 1][valid] / 8 - y).max() <= 0.5 + 1 / 16 + 1e-9
    np.testing.assert_array_equal(out["semseg"][valid], semseg_of(x, y))
    np.testing.assert_array_equal(out["parts"][valid], parts_of(x, y))
    np.testing.assert_array_equal(out["edge"][valid], edge_of(x, y))
    np.testing.assert_array_equal(out["saliency"][valid], saliency_of(x, y))
    expected_normals = normals_of(x, y)
    if flipped:
        expected_normals[:, 0] = -expected_normals[:, 0]
    np.testing.assert_array_equal(out["normals"][valid], expected_normals)
    # padding (the only place with depth 0) carries each task's pad value
    pad = ~valid
    assert (out["semseg"][pad] == 255).all() and (out["parts"][pad] == 255).all()
    assert (out["edge"][pad] == 255).all()
    assert (out["saliency"][pad] == 0).all()
    assert (out["normals"][pad] == 0).all()
    assert (out["image"][pad] == np.asarray(image_fill, dtype=np.uint8)).all()
    return valid


def check_dtypes(out: dict, raw: dict) -> None:
    for name, value in raw.items():
        if name != "meta":
            assert out[name].dtype == value.dtype, name


# ---------------------------------------------------------------- scaling and resizing
@pytest.mark.parametrize("factor", [1 / 3, 0.5, 0.75, 1.0, 1.37, 2.0])
def test_rescale_keeps_targets_aligned_and_divides_depth(factor):
    raw = make_raw()
    out = T.rescale(raw, factor)
    assert out["image"].shape == (
        int(np.floor(H * factor + 0.5)),
        int(np.floor(W * factor + 0.5)),
        3,
    )  # halves round up
    for name in ("semseg", "parts", "depth", "edge", "saliency"):
        assert out[name].shape == out["image"].shape[:2]
    assert out["normals"].shape == (*out["image"].shape[:2], 3)
    valid = check_aligned(out, factor)
    assert valid.all()
    check_dtypes(out, raw)
    # nearest resizing: no label value is created that the input does not have
    assert set(np.unique(out["semseg"])) <= set(np.unique(raw["semseg"]))
    assert set(np.unique(out["edge"])) <= {0.0, 1.0}


def test_alignment_check_detects_a_half_pixel_grid_shift():
    """cv2's INTER_NEAREST (corner-aligned) misplaces targets at 1/3 zoom: the checker must catch it."""
    raw = make_raw()
    h, w = round(H / 3), round(W / 3)
    shifted = T.rescale(raw, 1 / 3)
    shifted["depth"] = cv2.resize(raw["depth"], (w, h), interpolation=cv2.INTER_NEAREST) * np.float32(3)
    with pytest.raises(AssertionError):
        check_aligned(shifted, 1 / 3)


def test_rescale_matches_hand_computed_nearest_pixels():
    raw = make_raw()
    out = T.rescale(raw, 0.5)
    # output pixel (r, c) covers source pixels 2r..2r+1 and samples the centre-aligned one, 2r + 1
    y, x = np.mgrid[0:10, 0:15]
    np.testing.assert_array_equal(
        out["depth"], (1 + (2 * x + 1) + 100 * (2 * y + 1)).astype(np.float32) / np.float32(0.5)
    )
    # bilinear image at 1/2: midpoint of columns 2c and 2c+1 -> 8 * (2c + 0.5) = 16 c + 4
    np.testing.assert_array_equal(out["image"][..., 0], 16 * x + 4)


def test_invalid_markers_never_blend():
    raw = make_raw()
    raw["depth"][5:9, 7:12] = 0.0
    raw["normals"][5:9, 7:12] = 0.0
    raw["semseg"][5:9, 7:12] = 255
    for factor in (0.45, 1.7):
        out = T.rescale(raw, factor)
        d, n, s = out["depth"], out["normals"], out["semseg"]
        invalid = d == 0
        assert invalid.any()
        # invalid depth, zero normals and ignore labels coincide exactly (nothing in between)
        np.testing.assert_array_equal(invalid, np.abs(n).sum(-1) == 0)
        np.testing.assert_array_equal(invalid, s == 255)
        assert np.allclose(np.linalg.norm(n[~invalid], axis=-1), 1.0, atol=1e-6)


def test_random_scale_draws_one_uniform_factor_from_its_seed():
    raw = make_raw()
    draws = np.random.default_rng(7).uniform(0.5, 2.0, size=5)
    t = T.RandomScale((0.5, 2.0), seed=7)
    for factor in draws:
        out = t(raw)
        ref = T.rescale(raw, factor)
        for name in ("image", "semseg", "depth", "normals"):
            np.testing.assert_array_equal(out[name], ref[name])
        check_aligned(out, factor)
    heights = {T.RandomScale((0.5, 2.0), seed=s)(raw)["image"].shape[0] for s in range(40)}
    assert min(heights) >= 10 and max(heights) <= 40 and len(heights) > 10


def test_resize_does_not_rescale_depth_and_handles_anisotropy():
    raw = make_raw()
    out = T.Resize(13, 47)(raw)
    assert out["image"].shape == (13, 47, 3)
    check_aligned(out, factor=1.0)
    assert set(np.unique(out["depth"])) <= set(np.unique(raw["depth"]))
    check_dtypes(out, raw)


# ---------------------------------------------------------------- crops and padding
def test_crop_window_inside_is_an_exact_slice():
    raw = make_raw()
    out = T.crop_window(raw, 3, 5, 10, 12)
    for name, value in raw.items():
        if name != "meta":
            np.testing.assert_array_equal(out[name], value[3:13, 5:17], err_msg=name)
    assert out["meta"] == raw["meta"]


def test_random_crop_of_a_larger_image_is_a_contiguous_window():
    raw = make_raw()
    t = T.RandomCrop(8, 11, seed=3)
    corners = set()
    for _ in range(25):
        out = t(raw)
        assert out["image"].shape == (8, 11, 3)
        assert check_aligned(out).all()
        key = out["depth"].astype(np.int64) - 1
        x0, y0 = key[0, 0] % 100, key[0, 0] // 100
        rows, cols = np.mgrid[0:8, 0:11]
        np.testing.assert_array_equal(key, (x0 + cols) + 100 * (y0 + rows))
        assert 0 <= x0 <= W - 11 and 0 <= y0 <= H - 8
        corners.add((int(x0), int(y0)))
    assert len(corners) > 10


def test_random_crop_pads_a_smaller_image_with_per_task_values():
    raw = make_raw()
    fill = (124, 116, 104)
    t = T.RandomCrop(26, 41, image_fill=fill, seed=0)
    offsets = set()
    for _ in range(10):
        out = t(raw)
        assert out["image"].shape == (26, 41, 3)
        valid = check_aligned(out, image_fill=fill)
        # the whole source image appears exactly once, as one contiguous block
        assert valid.sum() == H * W
        np.testing.assert_array_equal(np.sort(out["depth"][valid]), np.sort(raw["depth"].ravel()))
        rows, cols = np.nonzero(valid)
        offsets.add((rows.min(), cols.min()))
        assert rows.max() - rows.min() == H - 1 and cols.max() - cols.min() == W - 1
        check_dtypes(out, raw)
    assert len(offsets) > 1  # the padding is split at random


def test_random_crop_pads_one_dimension_and_crops_the_other():
    raw = make_raw()
    out = T.RandomCrop(25, 10, seed=5)(raw)
    valid = check_aligned(out)
    assert valid.sum() == H * 10


def test_pad_to_pads_bottom_right_and_records_valid_size():
    raw = make_raw()
    raw["meta"] = {"id": "toy"}
    out = T.PadTo(24, 32, image_fill=(1, 2, 3))(raw)
    assert out["image"].shape == (24, 32, 3)
    for name, value in raw.items():
        if name != "meta":
            np.testing.assert_array_equal(out[name][:H, :W], value, err_msg=name)
    check_aligned(out, image_fill=(1, 2, 3))
    assert out["meta"] == {"id": "toy", "valid_size": (H, W), "size": (H, W)}
    assert raw["meta"] == {"id": "toy"}  # input untouched


def test_pad_to_nyud_size():
    raw = {
        "image": np.full((425, 560, 3), 9, np.uint8),
        "depth": np.ones((425, 560), np.float32),
        "meta": {"id": "n", "size": (425, 560)},
    }
    out = T.PadTo(448, 576)(raw)
    assert out["image"].shape == (448, 576, 3) and out["depth"].shape == (448, 576)
    assert out["depth"][:425, :560].min() == 1 and out["depth"][425:].max() == 0 and out["depth"][:, 560:].max() == 0
    assert out["meta"]["valid_size"] == (425, 560) and out["meta"]["size"] == (425, 560)


def test_pad_to_rejects_a_larger_sample():
    with pytest.raises(DatasetError, match=r"'toy'.*20 x 30.*16 x 40"):
        T.PadTo(16, 40)(make_raw())


# ---------------------------------------------------------------- flips
def test_hflip_mirrors_everything_and_negates_normals_x():
    raw = make_raw()
    out = T.hflip(raw)
    check_aligned(out, flipped=True)
    np.testing.assert_array_equal(out["depth"], raw["depth"][:, ::-1])
    np.testing.assert_array_equal(out["normals"][..., 0], -raw["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(out["normals"][..., 1:], raw["normals"][:, ::-1, 1:])
    back = T.hflip(out)
    for name, value in raw.items():
        if name != "meta":
            np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_horizontal_flip_probability():
    raw = make_raw()
    assert T.HorizontalFlip(p=0.0, seed=0)(raw)["depth"][0, 0] == 1
    assert T.HorizontalFlip(p=1.0, seed=0)(raw)["depth"][0, 0] == W
    t = T.HorizontalFlip(p=0.5, seed=0)
    flips = sum(t(raw)["depth"][0, 0] == W for _ in range(400))
    assert 150 < flips < 250


def test_flip_after_scale_and_crop_stays_aligned():
    raw = make_raw()
    out = T.hflip(T.RandomCrop(16, 16, seed=2)(T.rescale(raw, 1.3)))
    check_aligned(out, factor=1.3, flipped=True)


# ---------------------------------------------------------------- photometric
def _targets_identical(out, raw):
    for name, value in raw.items():
        if name not in ("image", "meta"):
            assert out[name].dtype == value.dtype
            np.testing.assert_array_equal(out[name], value, err_msg=name)


def test_photometric_changes_only_the_image():
    raw = make_raw()
    before = {k: v.copy() for k, v in raw.items() if k != "meta"}
    t = T.PhotometricDistortion(p=1.0, seed=0)
    changed = 0
    for _ in range(5):
        out = t(raw)
        _targets_identical(out, before)
        assert out["image"].dtype == np.uint8 and out["image"].shape == raw["image"].shape
        changed += int(not np.array_equal(out["image"], raw["image"]))
    assert changed == 5
    np.testing.assert_array_equal(raw["image"], before["image"])  # input untouched


def test_brightness_is_one_uniform_shift():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 216, size=(6, 7, 3), dtype=np.uint8)  # +-32 never clips
    t = T.PhotometricDistortion(32, (1, 1), (1, 1), 0, p=1.0, seed=4)
    shifts = set()
    for _ in range(10):
        diff = t({"image": image})["image"].astype(int) - image
        # float delta, truncated per pixel: the shift differs by at most 1 between pixels
        assert diff.max() - diff.min() <= 1 and np.abs(diff).max() <= 32
        shifts.add(int(diff.min()))
    assert len(shifts) > 3


def test_contrast_hand_computed():
    image = np.array([[[100, 200, 0], [10, 127, 128]]], dtype=np.uint8)
    t = T.PhotometricDistortion(0, (2, 2), (1, 1), 0, p=1.0, seed=0)
    np.testing.assert_array_equal(t({"image": image})["image"], [[[200, 255, 0], [20, 254, 255]]])


def test_saturation_keeps_greys_and_scales_hsv_saturation():
    image = np.array([[[90, 90, 90], [200, 150, 150]]], dtype=np.uint8)
    out = T.PhotometricDistortion(0, (1, 1), (2, 2), 0, p=1.0, seed=0)({"image": image})["image"]
    np.testing.assert_array_equal(out[0, 0], [90, 90, 90])
    s_in = int(cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[0, 1, 1])
    s_out = int(cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 1, 1])
    assert s_in == 64 and abs(s_out - 2 * s_in) <= 2  # S = (200 - 150) / 200 * 255; uint8 HSV round trip
    assert out[0, 1, 0] == 200 and out[0, 1, 1] == out[0, 1, 2] < 150  # value and hue kept, more saturated


def test_hue_shift_is_integer_rotation_of_opencv_hue():
    image = np.array([[[255, 0, 0], [0, 255, 0]]], dtype=np.uint8)  # hue 0 and 60
    t = T.PhotometricDistortion(0, (1, 1), (1, 1), 18, p=1.0, seed=9)
    seen = set()
    for _ in range(20):
        hue = cv2.cvtColor(t({"image": image})["image"], cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)
        shift = ((hue[1] - 60 + 90) % 180) - 90
        assert abs(shift) <= 18
        assert abs((((hue[0] - shift) + 90) % 180) - 90) <= 1
        seen.add(shift)
    assert len(seen) > 5


def test_photometric_is_seeded():
    raw = make_raw()
    a = [T.PhotometricDistortion(seed=3)(raw)["image"] for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    t = T.PhotometricDistortion(seed=3)
    assert any(not np.array_equal(t(raw)["image"], t(raw)["image"]) for _ in range(5))


# ---------------------------------------------------------------- pipelines
def test_train_pipeline_outputs_the_tensor_contract():
    raw = make_raw()
    pipe = T.train_transforms(16, 24, seed=0)
    for _ in range(6):
        out = pipe(raw)
        assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 16, 24)
        for name in ("semseg", "parts"):
            assert out[name].dtype == torch.int64 and out[name].shape == (16, 24)
        for name in ("depth", "edge", "saliency"):
            assert out[name].dtype == torch.float32 and out[name].shape == (1, 16, 24)
        assert out["normals"].dtype == torch.float32 and out["normals"].shape == (3, 16, 24)
        assert out["meta"]["id"] == "toy"
        labels = set(out["semseg"].unique().tolist())
        assert labels <= set(np.unique(raw["semseg"]).tolist()) | {255}


def to_raw(out: dict) -> dict:
    """A tensor sample back to raw numpy (image de-normalised to uint8)."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    image = (out["image"].numpy().transpose(1, 2, 0) * std + mean) * 255
    raw = {"image": np.rint(image).astype(np.uint8)}
    for name in ("semseg", "parts"):
        raw[name] = out[name].numpy()
    for name in ("depth", "edge", "saliency"):
        raw[name] = out[name][0].numpy()
    raw["normals"] = out["normals"].numpy().transpose(1, 2, 0)
    return raw


def test_train_pipeline_without_photometric_stays_aligned():
    raw = make_raw()
    pipe = T.train_transforms(16, 24, scale_range=(1.5, 1.5), photometric=False, seed=11)
    fill = T.mean_fill(IMAGENET_MEAN)
    seen_flip = set()
    for _ in range(12):
        out = pipe(raw)
        back = to_raw(out)
        key = np.rint(back["depth"].astype(np.float64) * 1.5).astype(np.int64)
        valid = back["depth"] > 0
        cols = np.nonzero(valid)[1]
        flipped = bool(np.corrcoef(cols, key[valid] % 100)[0, 1] < 0)
        seen_flip.add(flipped)
        check_aligned(back, factor=1.5, flipped=flipped, image_fill=fill)
    assert seen_flip == {False, True}


def test_train_pipeline_pads_when_zoomed_out():
    out = T.train_transforms(32, 48, scale_range=(0.5, 0.5), flip=False, photometric=False, seed=0)(make_raw())
    back = to_raw(out)
    valid = check_aligned(back, factor=0.5, image_fill=T.mean_fill(IMAGENET_MEAN))
    assert valid.sum() == 10 * 15
    # mean-colour padding normalises to (nearly) zero
    assert np.abs(out["image"].permute(1, 2, 0).numpy()[~valid]).max() < 0.01


def test_train_pipeline_is_reproducible_per_seed():
    raw = make_raw()
    a = T.train_transforms(16, 24, seed=5)
    b = T.train_transforms(16, 24, seed=5)
    c = T.train_transforms(16, 24, seed=6)
    outs_a = [a(raw) for _ in range(3)]
    outs_b = [b(raw) for _ in range(3)]
    outs_c = [c(raw) for _ in range(3)]
    for x, y in zip(outs_a, outs_b):
        for k in ("image", "semseg", "depth", "normals"):
            assert torch.equal(x[k], y[k])
    assert not all(torch.equal(x["image"], z["image"]) for x, z in zip(outs_a, outs_c))


def test_eval_pipeline_pads_without_resizing():
    raw = make_raw()
    out = T.eval_transforms(24, 32)(raw)
    ref = to_sample(raw)
    for k in ("image", "semseg", "parts", "depth", "normals", "edge", "saliency"):
        assert torch.equal(out[k][..., :H, :W], ref[k]), k
    assert out["image"].shape == (3, 24, 32)
    assert (out["semseg"][H:] == 255).all() and (out["edge"][..., :, W:] == 255).all()
    assert (out["depth"][..., H:, :] == 0).all() and (out["normals"][..., :, W:] == 0).all()
    assert out["image"][:, H:].abs().max() < 0.01  # mean-colour padding normalises to ~0
    assert out["meta"]["valid_size"] == (H, W)


def test_compose_applies_in_order_and_repr():
    pipe = T.Compose([T.Resize(10, 15), T.PadTo(12, 16)])
    out = pipe(make_raw())
    assert out["image"].shape == (12, 16, 3) and out["meta"]["valid_size"] == (10, 15)
    assert "Resize(10, 15)" in repr(pipe) and "PadTo(12, 16" in repr(pipe)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    raw = make_raw()
    bad = dict(raw, depth=raw["depth"][:-1])
    with pytest.raises(DatasetError, match=r"'depth'.*\(19, 30\).*\(20, 30\)"):
        T.hflip(bad)
    with pytest.raises(UnknownNameError, match="semsge.*did you mean 'semseg'"):
        T.Resize(5, 5)(dict(raw, semsge=raw["semseg"]))
    with pytest.raises(DatasetError, match="'image'"):
        T.RandomCrop(4, 4, seed=0)({"image": np.zeros((4, 4))})
    with pytest.raises(DatasetError, match="uint8"):
        T.PhotometricDistortion(seed=0)({"image": np.zeros((4, 4, 3), np.float32)})
    with pytest.raises(ValueError, match="scale_range"):
        T.RandomScale((2.0, 0.5))
    with pytest.raises(ValueError, match="positive integers"):
        T.RandomCrop(0, 5)
    with pytest.raises(ValueError, match="image_fill"):
        T.PadTo(5, 5, image_fill=(1, 2))
    with pytest.raises(ValueError, match="p must be"):
        T.HorizontalFlip(p=1.5)
    with pytest.raises(ValueError, match="factor"):
        T.rescale(raw, 0.0)


# ---------------------------------------------------------------- workers
class _Repeat(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.raw = make_raw()

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transform(self.raw)["image"].shape[0]


def test_dataloader_workers_draw_different_augmentations():
    ds = _Repeat(T.RandomScale((0.5, 2.0), seed=0))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(0), multiprocessing_context="fork"
    )
    first = list(loader)
    again = list(
        torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=2,
            generator=torch.Generator().manual_seed(0),
            multiprocessing_context="fork",
        )
    )
    # items 0 and 1 are each the first draw of a different worker: identical streams would repeat
    assert first[0] != first[1] or first[2] != first[3]
    assert first == again  # reproducible under a fixed torch seed


def test_reseed_makes_the_output_a_function_of_the_seed_only():
    raw = make_raw()
    a = T.train_transforms(16, 16, seed=1)
    b = T.train_transforms(16, 16, seed=2)
    b(raw)  # advance b's generators: reseeding must not depend on history
    a.reseed([7, 0, 3])
    b.reseed([7, 0, 3])
    out_a, out_b = a(raw), b(raw)
    assert torch.equal(out_a["image"], out_b["image"]) and torch.equal(out_a["depth"], out_b["depth"])
    a.reseed([7, 0, 4])
    assert not torch.equal(a(raw)["image"], out_a["image"])


def _two_class_strip() -> dict:
    """8 x 40: columns 0-31 class 0, 32-39 class 1 (a 8 x 8 crop is varied only at left 27-29)."""
    semseg = np.zeros((8, 40), dtype=np.int64)
    semseg[:, 32:] = 1
    return {"image": np.zeros((8, 40, 3), dtype=np.uint8), "semseg": semseg, "meta": {}}


def test_cat_max_ratio_redraws_crops_that_one_class_dominates():
    raw = _two_class_strip()

    def varied(out):
        share = np.bincount(out["semseg"].ravel(), minlength=2) / out["semseg"].size
        return share.min() > 0 and share.max() < 0.75

    checked = [varied(T.RandomCrop(8, 8, seed=s, cat_max_ratio=0.75)(raw)) for s in range(200)]
    plain = [varied(T.RandomCrop(8, 8, seed=s)(raw)) for s in range(200)]
    # one draw is varied with probability 3/33; ten checked draws and an unchecked last one:
    # 1 - (30/33)^10 (1 - 3/33) = 0.65
    assert 0.5 < np.mean(checked) < 0.8 and np.mean(plain) < 0.2
    assert repr(T.RandomCrop(8, 8, cat_max_ratio=0.75)) == "RandomCrop(8, 8, image_fill=(0.0, 0.0, 0.0), cat_max_ratio=0.75)"


def test_cat_max_ratio_keeps_the_eleventh_draw_ignores_255_and_needs_semseg():
    raw = _two_class_strip()
    raw["semseg"][:, 32:] = 255  # ignored: one class left, no window can pass
    out = T.RandomCrop(8, 8, seed=4, cat_max_ratio=0.75)(dict(raw, depth=np.arange(320, dtype=np.float32).reshape(8, 40, 1)))
    rng = np.random.default_rng(4)
    for _ in range(T.CAT_MAX_TRIES + 1):  # ten checked draws, then the last one unchecked
        top = int(rng.integers(0, 1))
        left = int(rng.integers(0, 33))
    assert top == 0 and out["depth"][0, 0, 0] == left
    no_labels = {"image": raw["image"], "depth": np.arange(320, dtype=np.float32).reshape(8, 40, 1), "meta": {}}
    a = T.RandomCrop(8, 8, seed=4, cat_max_ratio=0.75)(no_labels)
    b = T.RandomCrop(8, 8, seed=4)(no_labels)
    np.testing.assert_array_equal(a["depth"], b["depth"])  # no semseg target: no redraw
    with pytest.raises(ValueError, match="cat_max_ratio"):
        T.RandomCrop(8, 8, cat_max_ratio=0.0)
