"""Tests of the NYUD-v2 loader on tiny trees in both published layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtvision.data.nyud import NYUDv2, decode_segmentation
from mtvision.errors import DatasetError, UnknownNameError


def _expected_semseg(builders) -> np.ndarray:
    out = np.full((builders.H, builders.W), 255, dtype=np.uint8)
    out[0, 1], out[0, 2], out[0, 3], out[1, :] = 4, 39, 0, 11
    return out


def test_decode_segmentation_values():
    stored = np.array([[0, 1, 5, 40]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_segmentation(stored), [[255, 0, 4, 39]])
    with pytest.raises(DatasetError, match="seg.png holds value 41"):
        decode_segmentation(np.array([[41]], dtype=np.uint8), "seg.png")


def test_atrc_release_decodes_every_task(nyud_tree, builders):
    root, stored = nyud_tree("atrc")
    ds = NYUDv2(root, split="train")
    assert len(ds) == 2 and ds.ids == ["0001", "0002"]
    assert ds.release.name == "ATRC/InvPT" and "ATRC/InvPT" in repr(ds)
    raw = ds.load_raw(1)
    np.testing.assert_array_equal(raw["image"], stored["0002"]["image"])
    np.testing.assert_array_equal(raw["semseg"], _expected_semseg(builders))
    np.testing.assert_array_equal(raw["depth"], stored["0002"]["depth"])
    assert raw["depth"][2, 3] == 0.0 and raw["depth"].dtype == np.float32
    normals = raw["normals"]
    assert normals.dtype == np.float32 and normals.shape == (builders.H, builders.W, 3)
    np.testing.assert_allclose(normals[0, 0], [1.0, -1.0, 2 * 128 / 255 - 1], atol=1e-7)
    np.testing.assert_array_equal(normals[0, 1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(normals[0, 2], [-1.0, 1.0, 2 / 255 - 1], atol=1e-7)
    np.testing.assert_allclose(normals[3, 3], [2 * 200 / 255 - 1] * 3, atol=1e-7)
    expected_edge = np.zeros((builders.H, builders.W), np.float32)
    expected_edge[:, 4] = 1.0
    np.testing.assert_array_equal(raw["edge"], expected_edge)
    assert raw["meta"] == {"id": "0002", "size": (builders.H, builders.W)}


def test_val_split_and_tensor_sample(nyud_tree, builders):
    root, _ = nyud_tree("atrc")
    ds = NYUDv2(root, split="val", tasks=["semseg", "depth"])
    assert ds.ids == ["0003"]  # blank lines in the split file are skipped
    sample = ds[0]
    assert set(sample) == {"image", "semseg", "depth", "meta"}
    assert sample["semseg"].dtype == torch.int64
    assert torch.equal(sample["semseg"], torch.from_numpy(_expected_semseg(builders).astype(np.int64)))
    assert sample["depth"].shape == (1, builders.H, builders.W)
    assert ds.task_specs()["semseg"].out_channels == 40
    assert ds.meter_info() == {"boundary_tolerance": 0.011}


def test_mtinet_release_is_detected_and_decoded(nyud_tree, builders):
    root, stored = nyud_tree("mtinet")
    ds = NYUDv2(root, split="train", tasks=("normals", "edge", "semseg"))
    assert ds.release.name == "MTI-Net NYUD_MT" and "MTI-Net" in repr(ds)
    raw = ds.load_raw(0)
    assert set(raw) == {"image", "normals", "edge", "semseg", "meta"}
    assert raw["image"].shape == (builders.H, builders.W, 3)
    # JPEG q100 4:4:4 is within 2 levels of the original; swapped R and B would be ~55 levels off
    assert np.abs(raw["image"].astype(int) - stored["0001"]["image"].astype(int)).max() <= 3
    np.testing.assert_array_equal(raw["normals"], stored["0001"]["normals"])
    np.testing.assert_array_equal(raw["edge"], stored["0001"]["edge"])
    np.testing.assert_array_equal(raw["semseg"], _expected_semseg(builders))


def test_missing_root_split_and_files(nyud_tree, tmp_path):
    with pytest.raises(DatasetError, match="root directory not found.*nowhere"):
        NYUDv2(tmp_path / "nowhere")
    root, _ = nyud_tree("atrc")
    with pytest.raises(DatasetError, match="split must be one of"):
        NYUDv2(root, split="test")
    (root / "gt_sets" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"split file not found.*gt_sets/val.txt"):
        NYUDv2(root, split="val")
    (root / "depth" / "0002.npy").unlink()
    with pytest.raises(DatasetError, match=r"id '0002': missing file .*depth/0002.npy"):
        NYUDv2(root, split="train")
    NYUDv2(root, split="train", tasks=["semseg"])  # a task subset does not need depth


def test_no_image_for_first_id_names_both_layouts(nyud_tree):
    root, _ = nyud_tree("atrc")
    (root / "images" / "0001.png").unlink()
    with pytest.raises(DatasetError, match=r"images/0001.png.*images/0001.jpg"):
        NYUDv2(root)


def test_unreadable_and_truncated_image(nyud_tree):
    root, _ = nyud_tree("atrc")
    path = root / "images" / "0001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    ds = NYUDv2(root, tasks=["depth"])
    with pytest.raises(DatasetError, match=r"truncated PNG.*0001.png"):
        ds[0]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"IEND\xaeB`\x82")
    with pytest.raises(DatasetError, match=r"cannot decode.*0001.png"):
        ds[0]


def test_label_map_of_wrong_size(nyud_tree, builders):
    root, _ = nyud_tree("atrc")
    builders.write_png(root / "segmentation" / "0001.png", np.ones((builders.H + 1, builders.W), np.uint8))
    ds = NYUDv2(root, tasks=["semseg"])
    with pytest.raises(DatasetError, match=r"semseg map .*segmentation/0001.png has size \(7, 8\).*\(6, 8\)"):
        ds[0]


def test_depth_with_nan_or_inf(nyud_tree, builders):
    root, _ = nyud_tree("atrc")
    depth = np.ones((builders.H, builders.W), np.float32)
    depth[1, 1] = np.nan
    depth[2, 2] = np.inf
    builders.write_npy(root / "depth" / "0002.npy", depth)
    ds = NYUDv2(root, tasks=["depth"])
    ds[0]
    with pytest.raises(DatasetError, match=r"depth/0002.npy contains 2 NaN/Inf"):
        ds[1]


def test_normals_not_three_channels(nyud_tree, builders):
    root, _ = nyud_tree("atrc")
    builders.write_png(root / "normals" / "0001.png", np.full((builders.H, builders.W), 128, np.uint8))
    with pytest.raises(DatasetError, match=r"normals/0001.png must be a 3-channel"):
        NYUDv2(root, tasks=["normals"])[0]
    root2, _ = nyud_tree("mtinet")
    builders.write_npy(root2 / "normals" / "0001.npy", np.zeros((builders.H, builders.W, 2), np.float32))
    with pytest.raises(DatasetError, match=r"normals/0001.npy must be H x W x 3"):
        NYUDv2(root2, tasks=["normals"])[0]


def test_unknown_and_unavailable_tasks(nyud_tree):
    root, _ = nyud_tree("atrc")
    with pytest.raises(UnknownNameError, match="did you mean 'depth'"):
        NYUDv2(root, tasks=["deph"])
    with pytest.raises(DatasetError, match="cannot provide task 'parts'"):
        NYUDv2(root, tasks=["parts"])
