"""The Predictor: decoded numpy maps at the input size, batching, task subsets, preprocessing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtvision
from mtvision.inference import ImageError, Predictor, preprocess
from mtvision.models import PreprocessConfig, create_model

ALL = {"semseg": 6, "depth": None, "normals": None, "edge": None, "saliency": None}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(backbone="test_resnet", tasks=ALL, decoder_options={"neck_channels": 16, "head_channels": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return mtvision.load(model_dir)


def _image(h=37, w=53, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predict_returns_decoded_maps_at_input_size(predictor):
    out = predictor.predict(_image())
    assert list(out) == list(ALL)
    assert out["semseg"].shape == (37, 53) and out["semseg"].dtype == np.int64
    assert out["semseg"].min() >= 0 and out["semseg"].max() < 6
    assert out["depth"].shape == (37, 53) and out["depth"].dtype == np.float32 and out["depth"].min() >= 0
    assert out["normals"].shape == (37, 53, 3)
    assert np.allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-4)
    for t in ("edge", "saliency"):
        assert out[t].shape == (37, 53) and 0.0 <= out[t].min() and out[t].max() <= 1.0


def test_prediction_equals_model_forward_then_decode(model_dir, predictor):
    """Reference path by hand: pad to a multiple of 32, normalise, forward, crop, decode."""
    image = _image(64, 96, seed=1)  # already a multiple of 32: no padding, no resizing
    model = mtvision.models.load_model(model_dir)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((image / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1))[None]
    with torch.no_grad():
        raw = model(x).predictions
    out = predictor.predict(image)
    assert np.array_equal(out["semseg"], raw["semseg"].argmax(1)[0].numpy())
    np.testing.assert_allclose(out["depth"], raw["depth"].clamp_min(0)[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["saliency"], torch.sigmoid(raw["saliency"])[0, 0].numpy(), atol=1e-6)
    normals = torch.nn.functional.normalize(raw["normals"], dim=1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out["normals"], normals, atol=1e-5)


def test_save_load_predict_is_reproducible(model_dir, predictor, tmp_path):
    image = _image(45, 70, seed=2)
    first = predictor.predict(image)
    predictor.model.save_pretrained(tmp_path)
    second = mtvision.load(tmp_path).predict(image)
    for t in first:
        assert np.array_equal(first[t], second[t]), t


def test_list_input_batches_and_matches_single_predictions(predictor):
    images = [_image(37, 53, 3), _image(64, 64, 4), _image(37, 53, 5), _image(20, 90, 6)]
    batched = predictor.predict(images)
    assert isinstance(batched, list) and len(batched) == 4
    for image, result in zip(images, batched):
        single = predictor.predict(image)
        assert result["semseg"].shape == image.shape[:2]
        for t in single:
            np.testing.assert_allclose(result[t], single[t], atol=1e-4, err_msg=t)
    assert predictor.predict([]) == []


def test_single_task_prediction_runs_only_that_head(predictor):
    calls = {t: 0 for t in ALL}
    handles = [
        head.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
        for t, head in predictor.model.decoder.heads.items()
    ]
    try:
        image = _image(seed=7)
        depth_only = predictor.predict(image, tasks=["depth"])
    finally:
        for h in handles:
            h.remove()
    assert list(depth_only) == ["depth"]
    assert calls == {"semseg": 0, "depth": 1, "normals": 0, "edge": 0, "saliency": 0}
    np.testing.assert_allclose(depth_only["depth"], predictor.predict(image)["depth"], atol=1e-6)
    with pytest.raises(KeyError, match="did you mean 'depth'"):
        predictor.predict(image, tasks=["deph"])


@pytest.mark.parametrize(
    "mode, size, want",
    [("pad", None, (64, 96)), ("letterbox", [64, 64], (64, 64)), ("stretch", [48, 40], (48, 40))],
)
def test_preprocess_policies(mode, size, want):
    image = np.full((40, 70, 3), 255, dtype=np.uint8)
    cfg = PreprocessConfig(mode=mode, input_size=size)
    prep = preprocess(image, cfg)
    assert tuple(prep.tensor.shape) == (3, *want)
    assert prep.size == (40, 70)
    vh, vw = prep.valid
    white = (1.0 - np.array(cfg.mean)) / np.array(cfg.std)
    assert np.allclose(prep.tensor[:, :vh, :vw].mean(dim=(1, 2)).numpy(), white, atol=1e-5)
    assert torch.all(prep.tensor[:, vh:, :] == 0) and torch.all(prep.tensor[:, :, vw:] == 0)
    if mode == "letterbox":
        assert prep.valid == (37, 64)  # aspect ratio kept: 40 x 70 scaled by 64/70
    if mode == "stretch":
        assert prep.valid == (48, 40)


@pytest.mark.parametrize("mode, size", [("letterbox", [64, 64]), ("stretch", [32, 32])])
def test_resizing_policies_return_input_sized_maps(model_dir, tmp_path, mode, size):
    model = mtvision.models.load_model(model_dir)
    model.config.preprocess = PreprocessConfig(mode=mode, input_size=size)
    model.save_pretrained(tmp_path)
    out = mtvision.load(tmp_path).predict(_image(50, 81, seed=8))
    assert {t: v.shape[:2] for t, v in out.items()} == {t: (50, 81) for t in ALL}


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((32, 32, 3), np.float32) + 2.0, r"in \[0, 1\]"),
        (np.full((32, 32, 3), np.nan, np.float32), r"in \[0, 1\]"),
        (np.zeros((32, 32, 3), np.int32), "dtype int32"),
        (np.zeros((0, 32, 3), np.uint8), "empty"),
        (np.zeros((2, 32, 32, 3), np.uint8), "as a list"),
        (np.zeros((32, 32, 5), np.uint8), "H x W x 3"),
        ([[1, 2, 3]], "numpy array"),
        (torch.zeros(3, 32, 32), "predict_torch"),
        ("/no/such/photo.jpg", "no image file"),
    ],
)
def test_bad_images_are_clear_errors(predictor, bad, match):
    with pytest.raises(ImageError, match=match):
        predictor.predict(bad)


def test_bad_image_in_a_list_is_named(predictor):
    with pytest.raises(ImageError, match="image 1"):
        predictor.predict([_image(), np.zeros((8, 8), np.int16)])


# ---------------------------------------------------------------- inputs as users pass them
def _same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert list(a) == list(b)
    for t in a:
        np.testing.assert_allclose(a[t], b[t], atol=atol, rtol=0, err_msg=t)


def test_pil_images_and_paths_equal_the_array(predictor, tmp_path):
    from PIL import Image

    image = _image(40, 60, seed=11)
    want = predictor.predict(image)
    _same(predictor.predict(Image.fromarray(image)), want)
    Image.fromarray(image).save(tmp_path / "photo.png")
    _same(predictor.predict(tmp_path / "photo.png"), want)
    _same(predictor.predict(str(tmp_path / "photo.png")), want)
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(ImageError, match="cannot read"):
        predictor.predict(tmp_path / "broken.png")


def test_exif_orientation_of_a_photo_is_applied(predictor, tmp_path):
    from PIL import Image

    image = _image(40, 60, seed=12)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.fromarray(image).save(tmp_path / "sideways.png", exif=exif)
    upright = np.ascontiguousarray(np.rot90(image, k=-1))
    _same(predictor.predict(tmp_path / "sideways.png"), predictor.predict(upright))


def test_grey_images_are_replicated(predictor):
    from PIL import Image

    grey = _image(40, 60, seed=13)[..., 0]
    want = predictor.predict(np.repeat(grey[..., None], 3, axis=-1))
    _same(predictor.predict(grey), want)
    _same(predictor.predict(grey[..., None]), want)
    _same(predictor.predict(Image.fromarray(grey, mode="L")), want)


def test_rgba_drops_alpha_with_a_warning(predictor):
    from PIL import Image

    image = _image(40, 60, seed=14)
    rgba = np.concatenate([image, np.full((40, 60, 1), 7, np.uint8)], axis=-1)
    want = predictor.predict(image)
    with pytest.warns(UserWarning, match="alpha"):
        _same(predictor.predict(rgba), want)
    with pytest.warns(UserWarning, match="alpha"):
        _same(predictor.predict(Image.fromarray(rgba, mode="RGBA")), want)


def test_float_and_16_bit_images(predictor):
    image = _image(64, 96, seed=15)  # no resizing: the float path normalises the same values
    want = predictor.predict(image)
    _same(predictor.predict(image.astype(np.float64) / 255.0), want, atol=1e-5)
    _same(predictor.predict(image.astype(np.uint16) * 257), want, atol=1e-5)


def test_predict_torch_stays_on_the_device_and_equals_predict(predictor):
    images = np.stack([_image(40, 60, seed=s) for s in (16, 17)])
    want = predictor.predict(list(images))
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # N x 3 x H x W uint8
    got = predictor.predict_torch(x)
    assert list(got) == list(ALL)
    assert got["semseg"].shape == (2, 40, 60) and got["semseg"].dtype == torch.int64
    assert got["depth"].shape == (2, 1, 40, 60) and got["normals"].shape == (2, 3, 40, 60)
    assert all(v.device == predictor.device for v in got.values())
    for i in range(2):
        for t in ALL:
            have = got[t][i].numpy()
            have = have if t == "semseg" else (have[0] if have.shape[0] == 1 else have.transpose(1, 2, 0))
            np.testing.assert_allclose(have, want[i][t], atol=1e-5, err_msg=t)
    one = predictor.predict_torch(x[0].float() / 255.0, tasks=["depth"])
    assert list(one) == ["depth"] and one["depth"].shape == (1, 40, 60)
    np.testing.assert_allclose(one["depth"][0].numpy(), want[0]["depth"], atol=1e-5)
    with pytest.raises(ImageError, match="N x 3 x H x W"):
        predictor.predict_torch(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        predictor.predict_torch(torch.full((3, 8, 8), 3.0))


def test_max_size_shrinks_the_network_input_and_returns_full_size_maps(predictor, monkeypatch):
    image = _image(120, 200, seed=18)
    seen = []
    forward = predictor._forward
    monkeypatch.setattr(predictor, "_forward", lambda batch, names: seen.append(tuple(batch.shape[-2:])) or forward(batch, names))
    out = predictor.predict(image, max_size=64)
    assert seen == [(64, 64)]  # 38 x 64 after shrinking, padded to the size divisor 32
    assert {t: v.shape[:2] for t, v in out.items()} == {t: (120, 200) for t in ALL}
    small = predictor.predict(image[:50, :60], max_size=64)  # within the limit: untouched
    _same(small, predictor.predict(image[:50, :60]))
    torch_out = predictor.predict_torch(torch.from_numpy(image).permute(2, 0, 1), max_size=64)
    assert torch_out["semseg"].shape == (120, 200) and seen[-1] == (64, 64)
    with pytest.raises(ImageError, match="max_size"):
        predictor.predict(image, max_size=0)


def test_strip_decoding_equals_whole_map_decoding():
    from mtvision.inference import upsample_decode

    torch.manual_seed(0)
    raw = torch.randn(2, 5, 7, 9)
    for size in [(23, 31), (7, 40), (50, 9)]:
        whole = upsample_decode(raw, size, lambda r: r)
        strips = upsample_decode(raw, size, lambda r: r, max_elements=2 * 5 * size[1] * 3)  # 3 rows a strip
        # rows-then-columns rounds differently from both at once: a few float32 ulps of values up to ~4
        torch.testing.assert_close(strips, whole, atol=8 * 4 * 2**-23, rtol=0)
        labels = upsample_decode(raw, size, lambda r: r.argmax(1), max_elements=2 * 5 * size[1] * 4)
        assert labels.shape == (2, *size) and (labels == whole.argmax(1)).float().mean() > 0.999


def test_batching_differs_from_single_images_only_by_rounding(predictor):
    """The docstring's claim: equal to about 1e-6, bitwise with batch_size=1."""
    images = [_image(64, 64, s) for s in (21, 22, 23)]
    batched = predictor.predict(images)
    singles = [predictor.predict(im) for im in images]
    for b, s in zip(batched, singles):
        for t in ("depth", "normals", "saliency"):
            np.testing.assert_allclose(b[t], s[t], atol=1e-5, rtol=1e-5)
    one_by_one = Predictor(predictor.model, batch_size=1).predict(images)
    for b, s in zip(one_by_one, singles):
        for t in s:
            assert np.array_equal(b[t], s[t]), t
