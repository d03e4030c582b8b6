"""Tests of the PASCAL-Context loader, the human-parts mapping and label-map boundaries."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import scipy.io

from mtvision.data.pascal import (
    HUMAN_PART_MAP,
    NORMALS_VALID_CONTEXT_CLASSES,
    PascalContext,
    decode_human_parts,
    has_person,
    label_map_edges,
    thin,
)
from mtvision.errors import DatasetError, UnknownNameError


# ------------------------------------------------------------------ parts mapping
def test_human_part_map_groups_all_24_pascal_part_names():
    assert len(HUMAN_PART_MAP) == 24
    groups = {k: sorted(n for n, v in HUMAN_PART_MAP.items() if v == k) for k in range(1, 7)}
    assert groups[1] == sorted(["hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"])
    assert groups[2] == ["neck", "torso"]
    assert groups[3] == ["luarm", "ruarm"]
    assert groups[4] == ["lhand", "llarm", "rhand", "rlarm"]
    assert groups[5] == ["luleg", "ruleg"]
    assert groups[6] == ["lfoot", "llleg", "rfoot", "rlleg"]


def test_decode_human_parts_from_hand_built_anno(tmp_path, builders):
    path = builders.write_anno(tmp_path / "a.mat", builders.person_objects())
    anno = scipy.io.loadmat(path)["anno"]
    out = decode_human_parts(anno, (builders.H, builders.W), path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, builders.expected_parts())
    assert has_person(anno)
    dog_only = scipy.io.loadmat(builders.write_anno(tmp_path / "d.mat", [builders.person_objects()[1]]))["anno"]
    assert not has_person(dog_only)
    np.testing.assert_array_equal(decode_human_parts(dog_only, (builders.H, builders.W)), 0)


def test_unknown_part_name_is_reported(tmp_path, builders):
    mask = np.ones((builders.H, builders.W), bool)
    path = builders.write_anno(tmp_path / "u.mat", [("person", 15, mask, [("tail", mask)])])
    with pytest.raises(DatasetError, match=r"u.mat: unknown person part name 'tail'"):
        decode_human_parts(scipy.io.loadmat(path)["anno"], (builders.H, builders.W), path)


# ------------------------------------------------------------------ boundaries
def test_thin_reduces_two_pixel_band_to_its_left_column():
    # Guo-Hall by hand: the first sub-iteration deletes every pixel with an empty east neighbour that passes
    # G1/G2 (all of column 4) and the top-left corner (3, row 0: its NE and N are empty, its SE is set); the
    # rest of column 3 is protected by G3 (x1 and x2 set), and the second sub-iteration keeps the end points.
    band = np.zeros((6, 8), bool)
    band[:, 3:5] = True
    expected = np.zeros((6, 8), bool)
    expected[1:, 3] = True
    np.testing.assert_array_equal(thin(band), expected)


def test_thin_invariants():
    line = np.zeros((5, 7), bool)
    line[2, 1:6] = True
    np.testing.assert_array_equal(thin(line), line)  # already one pixel wide: unchanged
    block = np.zeros((9, 13), bool)
    block[2:7, 2:11] = True
    out = thin(block)
    assert out.any() and not (out & ~block).any()  # non-empty subset of the input
    assert out.sum() < block.sum() and (out.sum(axis=0) <= 1).all()  # a horizontal medial line
    np.testing.assert_array_equal(thin(out), out)  # idempotent


def test_label_map_edges_hand_computed():
    labels = np.full((6, 8), 440, np.uint16)
    labels[:, 4:] = 284
    expected = np.zeros((6, 8), np.float32)
    expected[1:, 3] = 1.0  # Laplacian band is columns 3-4; thinning keeps column 3 less its top corner
    out = label_map_edges(labels)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(label_map_edges(np.full((4, 4), 7)), 0.0)  # constant map: no edges


def test_normals_valid_classes_are_the_nyu_overlap():
    assert len(NORMALS_VALID_CONTEXT_CLASSES) == 170
    assert {440, 284, 427, 72, 397, 158, 68} <= NORMALS_VALID_CONTEXT_CLASSES  # wall person tv chair table floor ceiling
    assert not {360, 2, 187, 431} & NORMALS_VALID_CONTEXT_CLASSES  # sky aeroplane grass unknown


# ------------------------------------------------------------------ dataset
def test_every_task_decoded(pascal_tree, builders):
    root, stored = pascal_tree()
    ds = PascalContext(root, split="train")
    assert ds.ids == ["2008_000001", "2008_000002"] and "LabelMap" in repr(ds)
    raw = ds.load_raw(0)
    assert set(raw) == {"image", "semseg", "parts", "saliency", "normals", "edge", "meta"}
    assert np.abs(raw["image"].astype(int) - stored["2008_000001"]["image"].astype(int)).max() <= 3
    np.testing.assert_array_equal(raw["semseg"][0, :4], [0, 7, 20, 255])
    np.testing.assert_array_equal(raw["semseg"], stored["2008_000001"]["semseg"])
    np.testing.assert_array_equal(raw["parts"], builders.expected_parts())
    assert raw["saliency"].dtype == np.float32
    np.testing.assert_array_equal(raw["saliency"][0, :4], [1.0, 0.0, 1.0, 0.0])  # 200, 100, 128, 127
    assert raw["saliency"][1:].sum() == 0
    normals = raw["normals"]
    np.testing.assert_allclose(normals[1, 0], [1.0, -1.0, 2 * 128 / 255 - 1], atol=1e-7)  # wall: kept
    np.testing.assert_allclose(normals[1, 5], [2 * 10 / 255 - 1, 2 * 20 / 255 - 1, 2 * 30 / 255 - 1], atol=1e-7)
    np.testing.assert_array_equal(normals[0, 5:], 0.0)  # sky is no NYU class: zero vector
    np.testing.assert_allclose(normals[2, 2], [2 * 64 / 255 - 1] * 3, atol=1e-7)
    np.testing.assert_array_equal(raw["edge"], label_map_edges(builders.pascal_labelmap()))
    assert set(np.unique(raw["edge"])) == {0.0, 1.0}
    assert raw["meta"] == {"id": "2008_000001", "size": (builders.H, builders.W)}
    # an image without persons gets all-background parts when other tasks are asked for
    np.testing.assert_array_equal(ds.load_raw(1)["parts"], 0)
    sample = ds[0]
    assert sample["parts"].shape == (builders.H, builders.W) and int(sample["parts"].max()) == 6
    assert ds.task_specs()["parts"].out_channels == 7 and ds.task_specs()["semseg"].out_channels == 21
    assert ds.meter_info() == {"boundary_tolerance": 0.0075}


def test_parts_only_skips_images_without_persons(pascal_tree):
    root, _ = pascal_tree()
    assert PascalContext(root, split="train", tasks=["parts"]).ids == ["2008_000001"]
    assert PascalContext(root, split="train", tasks=["parts", "semseg"]).ids == ["2008_000001", "2008_000002"]
    # the reference's cache ImageSets/Parts/<split>.txt (id -> object classes) is used when complete
    cache = root / "ImageSets" / "Parts" / "train.txt"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"2008_000001": [12], "2008_000002": [15, 3]}))
    assert PascalContext(root, split="train", tasks=["parts"]).ids == ["2008_000002"]


def test_voc12_semseg_preferred_and_prepared_edges(pascal_tree, builders):
    root, _ = pascal_tree()
    voc = np.full((builders.H, builders.W), 3, np.uint8)
    builders.write_png(root / "semseg" / "VOC12" / "2008_000003.png", voc)
    edge = np.zeros((builders.H, builders.W), np.uint8)
    edge[2, :] = 255
    builders.write_png(root / "edge" / "2008_000003.png", edge)
    ds = PascalContext(root, split="val", tasks=["semseg", "edge"])
    assert "edges from png" in repr(ds)
    raw = ds.load_raw(0)
    np.testing.assert_array_equal(raw["semseg"], voc)
    np.testing.assert_array_equal(raw["edge"], edge.astype(np.float32) / 255.0)


def test_missing_root_split_and_files(pascal_tree, tmp_path):
    with pytest.raises(DatasetError, match="root directory not found"):
        PascalContext(tmp_path / "absent")
    root, _ = pascal_tree()
    with pytest.raises(DatasetError, match="split must be one of"):
        PascalContext(root, split="trainval")
    (root / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"split file not found.*Context/val.txt"):
        PascalContext(root, split="val")
    (root / "sal_distill" / "2008_000002.png").unlink()
    with pytest.raises(DatasetError, match=r"id '2008_000002': missing file .*sal_distill/2008_000002.png"):
        PascalContext(root, tasks=["saliency"])
    (root / "pascal-context" / "trainval" / "2008_000001.mat").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*trainval/2008_000001.mat"):
        PascalContext(root, tasks=["normals"])  # normals need the LabelMap for their class mask
    PascalContext(root, tasks=["semseg", "parts"])


def test_truncated_jpeg(pascal_tree):
    root, _ = pascal_tree()
    path = root / "JPEGImages" / "2008_000001.jpg"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match=r"truncated JPEG.*2008_000001.jpg"):
        PascalContext(root, tasks=["semseg"])[0]


def test_wrong_sizes_values_and_channels(pascal_tree, builders):
    root, _ = pascal_tree()
    H, W = builders.H, builders.W
    builders.write_png(root / "semseg" / "pascal-context" / "2008_000001.png", np.zeros((H, W + 2), np.uint8))
    with pytest.raises(DatasetError, match=r"2008_000001.png has size \(6, 10\)"):
        PascalContext(root, tasks=["semseg"])[0]
    builders.write_png(root / "semseg" / "pascal-context" / "2008_000001.png", np.full((H, W), 21, np.uint8))
    with pytest.raises(DatasetError, match=r"2008_000001.png holds value 21"):
        PascalContext(root, tasks=["semseg"])[0]
    builders.write_png(root / "normals_distill" / "2008_000002.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"normals_distill/2008_000002.png must be a 3-channel"):
        PascalContext(root, tasks=["normals"])[1]
    scipy.io.savemat(root / "pascal-context" / "trainval" / "2008_000001.mat", {"Other": np.zeros((H, W))})
    with pytest.raises(DatasetError, match=r"2008_000001.mat: missing variable.*LabelMap"):
        PascalContext(root, tasks=["edge"])[0]


def test_unknown_and_unavailable_tasks(pascal_tree):
    root, _ = pascal_tree()
    with pytest.raises(UnknownNameError, match="did you mean 'saliency'"):
        PascalContext(root, tasks=["salency"])
    with pytest.raises(DatasetError, match="cannot provide task 'depth'"):
        PascalContext(root, tasks=["depth"])


def test_thin_preserves_topology_of_a_thick_ring():
    yy, xx = np.mgrid[0:21, 0:21]
    radius = np.hypot(yy - 10, xx - 10)
    ring = (radius >= 4) & (radius <= 7)
    out = thin(ring)
    assert not (out & ~ring).any() and out.sum() < ring.sum() / 2
    assert cv2.connectedComponents(out.astype(np.uint8), connectivity=8)[0] - 1 == 1  # still one curve
    assert cv2.connectedComponents((~out).astype(np.uint8), connectivity=4)[0] - 1 == 2  # outside + the hole
    # one pixel wide: no 2 x 2 block of foreground survives
    assert not (out[:-1, :-1] & out[1:, :-1] & out[:-1, 1:] & out[1:, 1:]).any()


def test_an_assumed_camera_gives_pascal_samples_intrinsics_that_follow_the_transforms(pascal_tree, builders):
    from mtvision.config import DataConfig
    from mtvision.data import camera as C
    from mtvision.data.registry import make_dataset

    root, _ = pascal_tree()
    plain = make_dataset(DataConfig(dataset="pascal", root=str(root), tasks=["semseg"]), "train")
    assert "intrinsics" not in plain[0]["meta"]  # no camera unless one is assumed
    cfg = DataConfig(dataset="pascal", root=str(root), tasks=["semseg"], assumed_hfov=55.0)
    raw_size = (builders.H, builders.W)
    sample = make_dataset(cfg, "train")[0]
    np.testing.assert_allclose(sample["meta"]["intrinsics"], C.assumed_intrinsics(raw_size, 55.0))
    # the transforms move it with the pixels: resized to twice the size, it doubles
    from mtvision.data import transforms as T

    big = make_dataset(cfg, "train", T.Compose([T.Resize(2 * builders.H, 2 * builders.W), T.ToSample()]))[0]
    expected = C.resize_intrinsics(C.assumed_intrinsics(raw_size, 55.0), raw_size, (2 * builders.H, 2 * builders.W))
    np.testing.assert_allclose(np.asarray(big["meta"]["intrinsics"]), expected, atol=1e-6)
    assert expected[0, 0] == pytest.approx(2 * C.assumed_intrinsics(raw_size, 55.0)[0, 0])
