"""Pictures: colour maps for each kind of prediction and image grids."""

from __future__ import annotations

import numpy as np

from mtvision.cv import cv2


def label_palette(num: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved palette: `num` x 3 uint8, distinct neighbours."""
    palette = np.zeros((num, 3), dtype=np.uint8)
    for index in range(num):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


_PALETTE = label_palette(256)


def _as_map(array: np.ndarray) -> np.ndarray:
    """H x W view of a single-channel map given as H x W, 1 x H x W or H x W x 1."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        return array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"expected a single-channel map, got shape {array.shape}")
    return array


def colorize_labels(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class map H x W (ints) -> H x W x 3 uint8; ignored pixels are black, class 0 is not."""
    labels = np.asarray(labels).astype(np.int64)
    # shift by one so that class 0 gets a visible colour and ignore stays black
    shifted = np.where(labels == ignore_index, 0, (labels % 255) + 1)
    return _PALETTE[shifted]


def colorize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Depth H x W (or 1 x H x W) in metres -> H x W x 3 uint8 (turbo; near is red); 0 = invalid is black."""
    depth = _as_map(depth)
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return np.zeros((*depth.shape, 3), dtype=np.uint8)
    lo = float(depth[valid].min()) if vmin is None else vmin
    hi = float(depth[valid].max()) if vmax is None else vmax
    scaled = np.clip((depth - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    gray = ((1.0 - scaled) * 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals 3 x H x W or H x W x 3 in [-1, 1] -> H x W x 3 uint8 via (n + 1) / 2."""
    normals = np.asarray(normals, dtype=np.float32)
    if normals.ndim == 3 and normals.shape[0] == 3 and normals.shape[-1] != 3:
        normals = normals.transpose(1, 2, 0)
    rgb = ((normals + 1.0) * 0.5 * 255.0).round()
    rgb[np.all(normals == 0, axis=-1)] = 0
    return np.clip(rgb, 0, 255).astype(np.uint8)


def colorize_probability(prob: np.ndarray, ignore_value: float = 255) -> np.ndarray:
    """A map in [0, 1] (edges, saliency) -> gray H x W x 3 uint8; ignored pixels are dark red."""
    prob = _as_map(prob)
    ignored = prob == ignore_value
    gray = (np.clip(np.where(ignored, 0, prob), 0, 1) * 255).round().astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[ignored] = (96, 0, 0)
    return rgb


def image_grid(rows: list[list[np.ndarray]], pad: int = 2, titles: list[str] | None = None) -> np.ndarray:
    """Tile equally sized H x W x 3 uint8 pictures into one picture, rows by columns, optional column titles."""
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    title_h = 18 if titles else 0
    grid = np.full((title_h + len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c, title in enumerate(titles or []):
        cv2.putText(grid, title, (pad + c * (w + pad) + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile.shape[:2] != (h, w):
                tile = cv2.resize(tile, (w, h), interpolation=cv2.INTER_NEAREST)
            y, x = title_h + pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = tile
    return grid


def save_png(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 picture to `path` as PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def prediction_panel(image: np.ndarray, pictures: dict[str, np.ndarray]) -> np.ndarray:
    """One row: the RGB input followed by each colorized prediction, titled by its name."""
    return image_grid([[image, *pictures.values()]], titles=["image", *pictures])
