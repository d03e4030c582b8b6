import numpy as np
import pytest
import torch

from mtvision.data.sample import IMAGENET_MEAN, IMAGENET_STD, to_sample, validate_raw
from mtvision.errors import DatasetError


def _raw(h=4, w=5):
    return {
        "image": np.full((h, w, 3), 255, np.uint8),
        "semseg": np.full((h, w), 3, np.uint8),
        "depth": np.ones((h, w), np.float32),
        "normals": np.zeros((h, w, 3), np.float32),
        "meta": {"id": "a", "size": (h, w)},
    }


def test_to_sample_normalises_and_lays_out_channels_first():
    s = to_sample(_raw())
    expected = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(s["image"][:, 0, 0].numpy(), expected, rtol=1e-6)
    assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (4, 5)
    assert s["depth"].shape == (1, 4, 5) and s["normals"].shape == (3, 4, 5)
    assert s["meta"]["id"] == "a"


def test_validate_raw_catches_contract_breaks():
    validate_raw(_raw())
    bad = _raw()
    bad["depth"] = np.ones((3, 5), np.float32)
    with pytest.raises(DatasetError, match="depth map has size"):
        validate_raw(bad, "x")
    bad = _raw()
    bad["depth"][0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN or Inf"):
        validate_raw(bad)
    bad = _raw()
    bad["normals"] = np.zeros((4, 5), np.float32)
    with pytest.raises(DatasetError, match="normals map must have 3 channel"):
        validate_raw(bad)
    bad = _raw()
    bad["image"] = np.zeros((4, 5), np.uint8)
    with pytest.raises(DatasetError, match="image must be an H x W x 3"):
        validate_raw(bad)
