"""Tests of mtvision.data.io: every reader's decoded values and its errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mtvision.data import io
from mtvision.errors import DatasetError


def test_read_image_is_rgb_and_exact_for_png(tmp_path, builders):
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (1, 2, 3)
    path = builders.write_png(tmp_path / "a.png", rgb)
    out = io.read_image(path)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_image_converts_grey_to_three_equal_channels(tmp_path, builders):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = io.read_image(builders.write_png(tmp_path / "g.png", grey))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_image_is_reported(tmp_path, builders, suffix):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = (builders.write_png if suffix == "png" else builders.write_jpg)(tmp_path / f"t.{suffix}", rgb)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"truncated .*t\." + suffix):
        io.read_image(path)


def test_garbage_and_missing_and_empty_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="cannot decode.*bad.png"):
        io.read_image(bad)
    with pytest.raises(DatasetError, match="not found.*nope.png"):
        io.read_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.*empty.jpg"):
        io.read_image(empty)


def test_palette_png_gives_indices_not_colours(tmp_path):
    labels = np.array([[0, 5], [20, 255]], dtype=np.uint8)
    img = Image.fromarray(labels, mode="P")
    img.putpalette([(7 * i) % 256 for i in range(768)])
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(io.read_label_png(tmp_path / "p.png"), labels)


def test_label_png_keeps_16_bit_values_and_rejects_colour(tmp_path, builders):
    labels = np.array([[0, 300], [894, 65535]], dtype=np.uint16)
    out = io.read_label_png(builders.write_png(tmp_path / "l16.png", labels))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, labels)
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[0, 0] = (1, 2, 3)
    with pytest.raises(DatasetError, match="c.png must be single-channel"):
        io.read_label_png(builders.write_png(tmp_path / "c.png", colour))


def test_decode_normals_png_values():
    stored = np.array([[[255, 0, 128], [0, 0, 0], [0, 255, 1]]], dtype=np.uint8)
    out = io.decode_normals_png(stored)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [1.0, -1.0, 2 * 128 / 255 - 1], atol=1e-7)
    np.testing.assert_array_equal(out[0, 1], [0.0, 0.0, 0.0])  # all-zero stored -> invalid
    np.testing.assert_allclose(out[0, 2], [-1.0, 1.0, 2 / 255 - 1], atol=1e-7)


def test_read_normals_png_channel_order_and_grey_rejected(tmp_path, builders):
    stored = np.zeros((1, 2, 3), dtype=np.uint8)
    stored[0, 0] = (255, 128, 0)
    stored[0, 1] = (0, 0, 0)
    out = io.read_normals_png(builders.write_png(tmp_path / "n.png", stored))
    np.testing.assert_allclose(out[0, 0], [1.0, 2 * 128 / 255 - 1, -1.0], atol=1e-7)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    with pytest.raises(DatasetError, match="grey.png must be a 3-channel"):
        io.read_normals_png(builders.write_png(tmp_path / "grey.png", np.zeros((2, 2), np.uint8)))


def test_read_npy_values_and_refuses_pickles(tmp_path):
    arr = np.array([[1.5, 0.0]], dtype=np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(io.read_npy(tmp_path / "a.npy"), arr)
    np.save(tmp_path / "o.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="o.npy"):
        io.read_npy(tmp_path / "o.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetError, match="junk.npy"):
        io.read_npy(tmp_path / "junk.npy")


def test_read_mat_v5_and_missing_key(tmp_path):
    path = tmp_path / "v5.mat"
    scipy.io.savemat(path, {"LabelMap": np.array([[1, 2], [3, 4]], dtype=np.uint16), "other": np.ones(3)})
    assert not io.is_mat73(path)
    out = io.read_mat(path, keys=("LabelMap",))
    assert list(out) == ["LabelMap"]
    np.testing.assert_array_equal(out["LabelMap"], [[1, 2], [3, 4]])
    with pytest.raises(DatasetError, match=r"v5.mat.*missing variable.*'nope'"):
        io.read_mat(path, keys=("nope",))


def test_read_mat_v73_reverses_axes_like_matlab(tmp_path, builders):
    matlab = np.arange(6, dtype=np.float64).reshape(2, 3)  # as MATLAB sees it
    path = builders.write_mat73(tmp_path / "v73.mat", {"x": matlab})
    assert io.is_mat73(path)
    out = io.read_mat(path)
    np.testing.assert_array_equal(out["x"], matlab.T)
    with pytest.raises(DatasetError, match="missing variable"):
        io.read_mat(path, keys=("y",))


def test_read_mat_garbage_and_split_files(tmp_path):
    (tmp_path / "g.mat").write_bytes(b"\x00" * 200)
    with pytest.raises(DatasetError, match="g.mat"):
        io.read_mat(tmp_path / "g.mat")
    split = tmp_path / "s.txt"
    split.write_text(" a \n\nb\n")
    assert io.read_split(split) == ["a", "b"]
    split.write_text("\n \n")
    with pytest.raises(DatasetError, match="no ids"):
        io.read_split(split)
    with pytest.raises(DatasetError, match="split file not found"):
        io.read_split(tmp_path / "none.txt")


def test_check_size_and_finite_name_the_file():
    with pytest.raises(DatasetError, match=r"depth f.npy has size \(2, 2\).*\(3, 3\)"):
        io.check_size("f.npy", np.zeros((2, 2)), (3, 3), "depth")
    with pytest.raises(DatasetError, match="f.npy contains 2 NaN/Inf"):
        io.check_finite("f.npy", np.array([np.nan, np.inf, 1.0]), "depth")


def test_plain_hdf5_without_user_block_is_read_too(tmp_path):
    import h5py

    with h5py.File(tmp_path / "plain.mat", "w") as handle:
        handle.create_dataset("mapClass", data=np.arange(4.0)[:, None])
    assert io.is_mat73(tmp_path / "plain.mat")
    np.testing.assert_array_equal(io.read_mat(tmp_path / "plain.mat")["mapClass"], [[0.0], [1.0], [2.0], [3.0]])
