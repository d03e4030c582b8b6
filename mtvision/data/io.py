"""Readers for dataset files (PNG/JPEG, NPY, MATLAB .mat) that fail with a `DatasetError` naming the file.

Images and label maps are read with OpenCV, except palette PNGs (colour type 3), whose *indices* are the
labels: OpenCV expands palettes to colours, so those are read with Pillow. Compressed images are checked
for their end marker first, because decoders silently return a partly grey picture for a truncated file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from mtvision.cv import cv2
from mtvision.errors import DatasetError

PathLike = str | os.PathLike

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _read_bytes(path: PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {what} file {path}: {err}") from err
    if not data:
        raise DatasetError(f"{what} file is empty: {path}")
    return data


def _check_complete(path: PathLike, data: bytes) -> None:
    """Raise when a PNG or JPEG byte string lacks its end marker (a truncated download or copy)."""
    if data.startswith(_PNG_SIGNATURE):
        if _PNG_IEND not in data[-64:]:
            raise DatasetError(f"truncated PNG file (no IEND chunk at the end): {path}")
    elif data.startswith(_JPEG_SOI):
        if _JPEG_EOI not in data[-1024:]:  # trailing bytes after the marker are tolerated
            raise DatasetError(f"truncated JPEG file (no end-of-image marker): {path}")


def _decode(path: PathLike, data: bytes, flags: int) -> np.ndarray:
    _check_complete(path, data)
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if array is None:
        raise DatasetError(f"cannot decode image file {path} (not a readable PNG/JPEG)")
    return array


def read_image(path: PathLike) -> np.ndarray:
    """An RGB picture as uint8 H x W x 3 (grey and RGBA inputs are converted)."""
    data = _read_bytes(path, "image")
    bgr = _decode(path, data, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[..., ::-1])


def _png_color_type(data: bytes) -> int | None:
    """The colour type byte of a PNG's IHDR chunk, or None for non-PNG data."""
    if data.startswith(_PNG_SIGNATURE) and len(data) > 25:
        return data[25]
    return None


def read_png(path: PathLike, what: str = "label") -> np.ndarray:
    """A PNG's stored values unchanged: H x W (grey or palette indices) or H x W x C (RGB order)."""
    data = _read_bytes(path, what)
    if not data.startswith(_PNG_SIGNATURE):
        raise DatasetError(f"{what} file is not a PNG: {path}")
    if _png_color_type(data) == 3:  # palette: the indices are the labels
        _check_complete(path, data)
        from io import BytesIO

        from PIL import Image

        try:
            with Image.open(BytesIO(data)) as img:
                img.load()
                return np.asarray(img, dtype=np.uint8).copy()
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot decode palette PNG {path}: {err}") from err
    array = _decode(path, data, cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        if array.shape[2] == 4:
            array = array[..., :3]
        array = np.ascontiguousarray(array[..., ::-1])  # OpenCV gives BGR
    return array


def read_label_png(path: PathLike, what: str = "label map") -> np.ndarray:
    """A single-channel PNG as H x W; RGB files whose three channels agree are accepted too."""
    array = read_png(path, what)
    if array.ndim == 3:
        if array.shape[2] >= 3 and (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
            return np.ascontiguousarray(array[..., 0])
        raise DatasetError(f"{what} file {path} must be single-channel, got shape {array.shape}")
    return array


def read_npy(path: PathLike, what: str = "array") -> np.ndarray:
    """A .npy array (pickled objects refused)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DatasetError(f"cannot read {what} file {path} as .npy: {err}") from err


def is_mat73(path: PathLike) -> bool:
    """True when a .mat file is MATLAB v7.3 (HDF5 after a 512-byte user block) or plain HDF5."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(520)
            return head[:8] == _HDF5_SIGNATURE or head[512:520] == _HDF5_SIGNATURE
    except OSError:
        return False


def open_mat73(path: PathLike) -> Any:
    """An open read-only `h5py.File` for a v7.3 .mat (datasets read lazily; axes reversed vs MATLAB)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f".mat file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"cannot open {path} as a MATLAB v7.3 (HDF5) file: {err}") from err


def read_mat(path: PathLike, keys: tuple[str, ...] | None = None, **loadmat_kwargs: Any) -> dict[str, Any]:
    """Variables of a .mat file; v5 via scipy (kwargs passed on), v7.3 via h5py (numeric arrays, axes reversed).

    `keys`, when given, must all be present (DatasetError otherwise) and only they are returned.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f".mat file not found: {path}")
    if is_mat73(path):
        with open_mat73(path) as handle:
            names = [k for k in handle.keys() if not k.startswith("#")]
            wanted = list(keys) if keys is not None else names
            _require_keys(path, wanted, names)
            out: dict[str, Any] = {}
            for key in wanted:
                node = handle[key]
                if not hasattr(node, "shape"):
                    raise DatasetError(f"{path}: variable {key!r} is a group (struct/cell), not a numeric array")
                out[key] = np.asarray(node[()])
            return out
    try:
        content = scipy.io.loadmat(path, variable_names=list(keys) if keys else None, **loadmat_kwargs)
    except Exception as err:  # scipy raises many types (MatReadError, ValueError, zlib.error, ...) for bad files
        raise DatasetError(f"cannot read .mat file {path}: {err}") from err
    names = [k for k in content if not k.startswith("__")]
    wanted = list(keys) if keys is not None else names
    _require_keys(path, wanted, names)
    return {k: content[k] for k in wanted}


def _require_keys(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [k for k in wanted if k not in present]
    if missing:
        raise DatasetError(f"{path}: missing variable(s) {missing} (found: {sorted(present)})")


def read_split(path: PathLike) -> list[str]:
    """Sample ids of a split file, one a line (blank lines and surrounding spaces ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    try:
        ids = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read split file {path}: {err}") from err
    ids = [i for i in ids if i]
    if not ids:
        raise DatasetError(f"split file {path} lists no ids")
    return ids


def check_size(path: PathLike, array: np.ndarray, size: tuple[int, int], what: str) -> None:
    """Raise when `array`'s H x W differs from the image size."""
    if tuple(array.shape[:2]) != tuple(size):
        raise DatasetError(f"{what} {path} has size {tuple(array.shape[:2])} but the image has size {tuple(size)}")


def check_finite(path: PathLike, array: np.ndarray, what: str) -> None:
    """Raise when `array` holds NaN or Inf."""
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DatasetError(f"{what} {path} contains {bad} NaN/Inf value(s)")


def decode_normals_png(stored: np.ndarray) -> np.ndarray:
    """Stored RGB normals (uint8 H x W x 3, xyz) -> float32 2 v / 255 - 1; all-zero pixels -> zero vector."""
    normals = 2.0 * stored.astype(np.float32) / 255.0 - 1.0
    normals[(stored == 0).all(axis=2)] = 0.0
    return normals


def read_normals_png(path: PathLike) -> np.ndarray:
    """A normals PNG decoded by `decode_normals_png` (DatasetError unless it is 3-channel 8-bit)."""
    stored = read_png(path, "normals")
    if stored.ndim != 3 or stored.shape[2] != 3:
        raise DatasetError(f"normals {path} must be a 3-channel PNG, got shape {stored.shape}")
    if stored.dtype != np.uint8:
        raise DatasetError(f"normals {path} must be 8-bit, got {stored.dtype}")
    return decode_normals_png(stored)


def open_root(root: str | os.PathLike, split: str, splits: tuple[str, ...], dataset: str) -> Path:
    """`root` as a Path, after checking that it is a folder and that `split` is one of `splits`."""
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"{dataset} root directory not found: {path}")
    if split not in splits:
        raise DatasetError(f"{dataset} split must be one of {splits}, got {split!r}")
    return path
