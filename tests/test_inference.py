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
        (np.zeros((32, 32), np.uint8), "grayscale"),
        (np.zeros((32, 32, 1), np.uint8), "grayscale"),
        (np.zeros((32, 32, 4), np.uint8), "RGBA"),
        (np.zeros((32, 32, 3), np.float32), "dtype uint8"),
        (np.zeros((0, 32, 3), np.uint8), "empty"),
        (np.zeros((2, 32, 32, 3), np.uint8), "H x W x 3"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images_are_clear_errors(predictor, bad, match):
    with pytest.raises(ImageError, match=match):
        predictor.predict(bad)


def test_bad_image_in_a_list_is_named(predictor):
    with pytest.raises(ImageError, match="image 1"):
        predictor.predict([_image(), np.zeros((8, 8), np.uint8)])
