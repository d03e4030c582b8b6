"""The NYUv2-13 loader on fixture trees in MTAN's exact layout (ROOT/{train,val}/{image,label,depth,normal}/<i>.npy)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtvision.data.nyud import NYUDv2
from mtvision.data.nyuv2_13 import NYUv2MTAN, decode_label, is_nyuv2_13_root
from mtvision.data.registry import make_dataset
from mtvision.data.transforms import train_transforms
from mtvision.errors import DatasetError
from mtvision.metrics.nyuv2_13 import NYUV2_13_BENCHMARK


def write_nyuv2_13_tree(root: Path, sizes: dict[str, int] | None = None, height: int = 32, width: int = 48,
                        seed: int = 0) -> Path:
    """A tree in MTAN's preprocessed NYUv2-13 format: float images in [0, 1], float labels -1..12
    (every class present in each image), depth H x W x 1 with zeros, unit normals H x W x 3 with zeros."""
    rng = np.random.default_rng(seed)
    for split, n in (sizes or {"train": 4, "val": 3}).items():
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.random((height, width, 3)).astype(np.float32)
            label = np.resize(np.arange(-1, 13), height * width).reshape(height, width)
            label = rng.permutation(label.reshape(-1)).reshape(height, width).astype(np.float32)
            depth = rng.uniform(0.5, 8.0, (height, width, 1)).astype(np.float32)
            depth[0, :3] = 0.0
            normal = rng.normal(size=(height, width, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            normal[1, :2] = 0.0
            for folder, value in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
                np.save(root / split / folder / f"{i}.npy", value)
    return root


def test_samples_decode_as_stored(tmp_path):
    root = write_nyuv2_13_tree(tmp_path / "nyuv2")
    ds = NYUv2MTAN(root, split="train")
    assert len(ds) == 4 and len(NYUv2MTAN(root, split="val")) == 3
    raw = ds.load_raw(2)
    stored = {k: np.load(root / "train" / k / "2.npy") for k in ("image", "label", "depth", "normal")}
    np.testing.assert_allclose(raw["image"], stored["image"] * 255.0, rtol=1e-6)
    assert raw["image"].dtype == np.float32 and raw["image"].shape == (32, 48, 3)
    label = stored["label"].astype(np.int64)
    assert raw["semseg"].dtype == np.uint8
    assert (raw["semseg"][label == -1] == 255).all()
    assert (raw["semseg"][label >= 0] == label[label >= 0]).all()
    np.testing.assert_array_equal(raw["depth"], stored["depth"][..., 0])
    np.testing.assert_array_equal(raw["normals"], stored["normal"])
    assert raw["meta"] == {"id": "2", "size": (32, 48)}


def test_tensor_samples_give_back_the_stored_image_with_unit_preprocessing(tmp_path):
    root = write_nyuv2_13_tree(tmp_path / "nyuv2")
    ds = NYUv2MTAN(root, split="val")
    tf = train_transforms(32, 48, scale_range=None, flip=False, photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    ds.transform = tf
    sample = ds[0]
    stored = np.load(root / "val" / "image" / "0.npy")
    np.testing.assert_allclose(sample["image"].numpy(), stored.transpose(2, 0, 1), atol=1e-6)
    assert sample["semseg"].dtype == torch.int64 and sample["depth"].shape == (1, 32, 48)


def test_augmentation_zooms_depth_and_flips_normals(tmp_path):
    root = write_nyuv2_13_tree(tmp_path / "nyuv2", {"train": 1})
    ds = NYUv2MTAN(root, split="train", tasks=["depth", "normals"])
    raw = ds.load_raw(0)
    flip = train_transforms(32, 48, scale_range=None, flip=True, photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    zoom = train_transforms(32, 48, scale_range=(2.0, 2.0), flip=False, photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    flipped = None
    for seed in range(20):  # a flip happens with probability 1/2
        flip.reseed([seed])
        out = flip(dict(raw))
        if not np.allclose(out["normals"].numpy(), raw["normals"].transpose(2, 0, 1)):
            flipped = out
            break
    assert flipped is not None
    expect = raw["normals"][:, ::-1].copy()
    expect[..., 0] *= -1
    np.testing.assert_allclose(flipped["normals"].numpy(), expect.transpose(2, 0, 1))
    zoom.reseed([0])
    zoomed = zoom(dict(raw))["depth"].numpy()
    valid = zoomed > 0
    assert zoomed[valid].max() <= raw["depth"].max() / 2 + 1e-5  # twice as close


def test_registry_config_and_benchmark(tmp_path):
    root = write_nyuv2_13_tree(tmp_path / "nyuv2")
    cfg = SimpleNamespace(dataset="nyuv2_13", root=str(root), tasks=["semseg", "normals"])
    ds = make_dataset(cfg, "val")
    assert isinstance(ds, NYUv2MTAN) and ds.tasks == ("semseg", "normals") and "depth" not in ds.load_raw(0)
    assert ds.num_classes == {"semseg": 13} and len(ds.class_names) == 13
    assert ds.meter_info()["benchmark"] is NYUV2_13_BENCHMARK
    assert is_nyuv2_13_root(root) and not is_nyuv2_13_root(tmp_path)


def test_nyud_loader_recognises_the_layout(tmp_path):
    root = write_nyuv2_13_tree(tmp_path / "nyuv2")
    with pytest.raises(DatasetError, match="data.dataset: nyuv2_13"):
        NYUDv2(root, split="train")
    (tmp_path / "nyud" / "gt_sets").mkdir(parents=True)
    with pytest.raises(DatasetError, match="data.dataset: nyud"):
        NYUv2MTAN(tmp_path / "nyud", split="train")


def test_broken_trees_are_clear_errors(tmp_path):
    root = write_nyuv2_13_tree(tmp_path / "a", {"train": 3})
    with pytest.raises(DatasetError, match="split must be one of"):
        NYUv2MTAN(root, split="test")
    (root / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(DatasetError, match="missing file .*depth/1.npy"):
        NYUv2MTAN(root, split="train")
    NYUv2MTAN(root, split="train", tasks=["semseg"])  # depth not asked for: fine
    root = write_nyuv2_13_tree(tmp_path / "b", {"train": 3})
    (root / "train" / "image" / "1.npy").unlink()
    with pytest.raises(DatasetError, match="1.npy is missing"):
        NYUv2MTAN(root, split="train")
    root = write_nyuv2_13_tree(tmp_path / "c", {"train": 1})
    np.save(root / "train" / "depth" / "0.npy", np.ones((32, 48, 2), np.float32))
    with pytest.raises(DatasetError, match="H x W x 1"):
        NYUv2MTAN(root, split="train")[0]
    np.save(root / "train" / "depth" / "0.npy", np.ones((16, 48, 1), np.float32))
    with pytest.raises(DatasetError, match="size"):
        NYUv2MTAN(root, split="train")[0]


def test_label_decoding_checks_values():
    np.testing.assert_array_equal(decode_label(np.array([[-1.0, 0.0, 12.0]])), [[255, 0, 12]])
    with pytest.raises(DatasetError, match="-1..12"):
        decode_label(np.array([[13]]))
    with pytest.raises(DatasetError, match="non-integral"):
        decode_label(np.array([[0.5]]))
