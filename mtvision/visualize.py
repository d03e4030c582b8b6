"""Pictures: colour maps for each kind of map, the keys that make them readable, and image grids.

Colour maps (the `Task.colorize` functions of `mtvision/tasks.py`):
    labels       the PASCAL VOC palette (class c gets colour c + 1, so class 0 is not black); ignore black
    depth        turbo, near red and far blue; 0 = invalid (black) in targets only
    normals      (n + 1) / 2 as RGB; the zero vector (invalid) black
    probability  inferno heat map from 0 (black) to 1 (pale yellow); ignored pixels mid grey

`picture(colorize, map, ...)` draws a map with its key to the right: a legend of the classes present
with their names, a colour bar in metres for depth, a colour sphere for normals (the OpenCV camera
frame of the data: x right, y down, z forward; surfaces facing the camera are in the middle), a 0..1
scale for probabilities.  `prediction_panel` puts an image and such pictures side by side, titled.
Text is drawn with OpenCV's Hershey font, sized to the picture's height.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from mtvision.cv import cv2

IGNORE_PROBABILITY_RGB = (128, 128, 128)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX


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


def _colormap(unit: np.ndarray, cmap: int) -> np.ndarray:
    """Values in [0, 1] -> H x W x 3 uint8 RGB through OpenCV colour map `cmap`."""
    gray = (np.clip(unit, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, cmap), cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------- colour maps
def label_colour(class_id: int, ignore_index: int = 255) -> tuple[int, int, int]:
    """The colour `colorize_labels` gives class `class_id`."""
    if class_id == ignore_index:
        return BLACK
    r, g, b = _PALETTE[(class_id % 255) + 1]
    return int(r), int(g), int(b)


def colorize_labels(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class map H x W (ints) -> H x W x 3 uint8; ignored pixels are black, class 0 is not."""
    labels = np.asarray(labels).astype(np.int64)
    # shift by one so that class 0 gets a visible colour and ignore stays black
    shifted = np.where(labels == ignore_index, 0, (labels % 255) + 1)
    return _PALETTE[shifted]


def depth_range(depth: np.ndarray, zero_is_invalid: bool = True) -> tuple[float, float] | None:
    """(nearest, farthest) of the valid pixels of a depth map, None when none is valid."""
    depth = _as_map(depth)
    valid = np.isfinite(depth) & ((depth > 0) if zero_is_invalid else (depth >= 0))
    if not valid.any():
        return None
    return float(depth[valid].min()), float(depth[valid].max())


def colorize_depth(
    depth: np.ndarray, vmin: float | None = None, vmax: float | None = None, zero_is_invalid: bool = True
) -> np.ndarray:
    """Depth H x W (or 1 x H x W) in metres -> H x W x 3 uint8 (turbo; near is red) over [vmin, vmax]
    (default: the valid range).  `zero_is_invalid`: 0 marks missing depth (targets), drawn black; a
    prediction's 0 is a depth like any other (pass False)."""
    depth = _as_map(depth)
    valid = np.isfinite(depth) & ((depth > 0) if zero_is_invalid else (depth >= 0))
    if not valid.any():
        return np.zeros((*depth.shape, 3), dtype=np.uint8)
    lo = float(depth[valid].min()) if vmin is None else vmin
    hi = float(depth[valid].max()) if vmax is None else vmax
    scaled = np.clip((np.where(valid, depth, lo) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgb = _colormap(1.0 - scaled, cv2.COLORMAP_TURBO)
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
    """A map in [0, 1] (edges, saliency) -> inferno heat map H x W x 3 uint8; ignored pixels mid grey."""
    prob = _as_map(prob)
    ignored = prob == ignore_value
    rgb = _colormap(np.where(ignored, 0.0, prob), cv2.COLORMAP_INFERNO)
    rgb[ignored] = IGNORE_PROBABILITY_RGB
    return rgb


# ---------------------------------------------------------------- keys
def text_size(height: int) -> tuple[float, int, int]:
    """(font scale, thickness, line height in pixels) for text next to a picture `height` pixels tall."""
    scale = min(3.0, max(0.35, height / 420.0))
    return scale, max(1, round(scale * 1.1)), max(10, round(26 * scale))


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float, thickness: int, colour=BLACK) -> None:
    cv2.putText(canvas, text, (int(x), int(y)), FONT, scale, colour, thickness, cv2.LINE_AA)


def _text_width(text: str, scale: float, thickness: int) -> int:
    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def label_legend(
    ids: Sequence[int], names: Sequence[str] | None, height: int, ignore_index: int = 255
) -> np.ndarray:
    """A white legend `height` pixels tall: a colour swatch and the name of each class in `ids` (the
    ignore label as 'ignore'), in as many columns as needed."""
    scale, thick, line = text_size(height)
    entries = []
    for class_id in ids:
        if class_id == ignore_index:
            entries.append((BLACK, "ignore"))
        else:
            name = names[class_id] if names is not None and 0 <= class_id < len(names) else f"class {class_id}"
            entries.append((label_colour(class_id, ignore_index), name))
    pad = max(3, line // 4)
    per_column = max(1, (height - 2 * pad) // line)
    columns = [entries[i : i + per_column] for i in range(0, len(entries), per_column)] or [[]]
    swatch = line - 2 * max(1, line // 8)
    widths = [pad + swatch + pad + max((_text_width(n, scale, thick) for _, n in col), default=0) + pad for col in columns]
    legend = np.full((height, sum(widths) + pad, 3), 255, dtype=np.uint8)
    x0 = pad
    for col, width in zip(columns, widths):
        for row, (colour, name) in enumerate(col):
            top = pad + row * line + (line - swatch) // 2
            cv2.rectangle(legend, (x0, top), (x0 + swatch - 1, top + swatch - 1), colour, -1)
            cv2.rectangle(legend, (x0, top), (x0 + swatch - 1, top + swatch - 1), (90, 90, 90), 1)
            baseline = pad + row * line + (line + cv2.getTextSize(name, FONT, scale, thick)[0][1]) // 2
            _text(legend, name, x0 + swatch + pad, baseline, scale, thick)
        x0 += width
    return legend


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) within [lo, hi], about `count` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _format_tick(value: float, step: float) -> str:
    """`value` with as many decimals as the tick step needs (0.5 -> 1, 0.25 -> 2)."""
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def colour_bar(
    lo: float, hi: float, height: int, colorize: Callable[[np.ndarray], np.ndarray], unit: str = ""
) -> np.ndarray:
    """A white key `height` pixels tall: a vertical bar of `colorize` over [lo, hi] (hi at the top) with
    round tick values and `unit` above it."""
    scale, thick, line = text_size(height)
    pad = max(3, line // 3)
    top, bottom = pad + (line if unit else 0), height - pad - line // 2
    bar_h = max(2, bottom - top)
    bar_w = max(8, line)
    values = np.linspace(hi, lo, bar_h, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    bar = colorize(values)
    ticks = nice_ticks(lo, hi) if hi > lo else [lo]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else max(abs(lo), 1.0)
    labels = [_format_tick(t, step) for t in ticks]
    text_w = max([_text_width(s, scale, thick) for s in labels] + [_text_width(unit, scale, thick)])
    key = np.full((height, pad + bar_w + pad + max(4, line // 3) + text_w + pad, 3), 255, dtype=np.uint8)
    key[top : top + bar_h, pad : pad + bar_w] = bar
    cv2.rectangle(key, (pad - 1, top - 1), (pad + bar_w, top + bar_h), (90, 90, 90), 1)
    if unit:
        _text(key, unit, pad, pad + line * 3 // 4, scale, thick)
    for value, label in zip(ticks, labels):
        y = top + round((hi - value) / (hi - lo) * (bar_h - 1)) if hi > lo else top + bar_h // 2
        cv2.line(key, (pad + bar_w, y), (pad + bar_w + max(3, line // 3), y), BLACK, thick)
        text_h = cv2.getTextSize(label, FONT, scale, thick)[0][1]
        _text(key, label, pad + bar_w + max(4, line // 3) + 2, y + text_h // 2, scale, thick)
    return key


def normals_sphere(diameter: int) -> np.ndarray:
    """A sphere seen by the camera, coloured by `colorize_normals` of its surface normals (white outside):
    in the OpenCV camera frame a point (u, v) of the unit disk has normal (u, v, -sqrt(1 - u^2 - v^2))."""
    coords = (np.arange(diameter, dtype=np.float32) + 0.5) / diameter * 2.0 - 1.0
    u, v = np.meshgrid(coords, coords)
    inside = u**2 + v**2 <= 1.0
    normals = np.stack([u, v, -np.sqrt(np.clip(1.0 - u**2 - v**2, 0.0, 1.0))], axis=-1)
    rgb = colorize_normals(np.where(inside[..., None], normals, 0.0))
    rgb[~inside] = 255
    return rgb


def normals_key(height: int) -> np.ndarray:
    """A white key `height` pixels tall: the colour sphere of `normals_sphere` with its directions named."""
    scale, thick, line = text_size(height)
    small = scale * 0.85
    words = {"up": "up", "down": "down", "left": "left", "right": "right"}
    side = max(_text_width(words["left"], small, thick), _text_width(words["right"], small, thick))
    caption = ["centre: facing", "the camera"]
    caption_w = max(_text_width(c, small, thick) for c in caption)
    diameter = max(16, min(height - 4 * line, 6 * line + 40))
    width = max(2 * side + diameter + 4 * 4, caption_w + 8)
    key = np.full((height, width, 3), 255, dtype=np.uint8)
    x0 = (width - diameter) // 2
    y0 = max(line + 4, (height - diameter) // 2 - line)
    key[y0 : y0 + diameter, x0 : x0 + diameter] = normals_sphere(diameter)
    cx, cy = x0 + diameter // 2, y0 + diameter // 2
    text_h = cv2.getTextSize("up", FONT, small, thick)[0][1]
    _text(key, words["up"], cx - _text_width(words["up"], small, thick) // 2, y0 - 4, small, thick)
    _text(key, words["down"], cx - _text_width(words["down"], small, thick) // 2, y0 + diameter + text_h + 4, small, thick)
    _text(key, words["left"], x0 - _text_width(words["left"], small, thick) - 3, cy + text_h // 2, small, thick)
    _text(key, words["right"], x0 + diameter + 3, cy + text_h // 2, small, thick)
    for i, text in enumerate(caption):
        y = y0 + diameter + text_h + 4 + line * (i + 1)
        if y < height - 2:
            _text(key, text, (width - _text_width(text, small, thick)) // 2, y, small, thick)
    return key


def hstack(pictures: Sequence[np.ndarray], gap: int = 0) -> np.ndarray:
    """Pictures side by side on white, top-aligned."""
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for p in pictures:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


# ---------------------------------------------------------------- a map with its key
def value_range(colorize: Callable, values: Sequence[np.ndarray], predictions: Sequence[bool]) -> tuple[float, float] | None:
    """The shared colour scale of several maps drawn by `colorize` (depth: the union of their valid
    ranges; other maps have fixed scales: None)."""
    if colorize is not colorize_depth:
        return None
    ranges = [r for v, p in zip(values, predictions) if (r := depth_range(v, zero_is_invalid=not p)) is not None]
    if not ranges:
        return None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def colorize_map(
    colorize: Callable, value: np.ndarray, prediction: bool = True, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """`colorize(value)`, with a prediction's depth 0 drawn as a depth and depth on `value_range` when given."""
    if colorize is colorize_depth:
        lo, hi = value_range if value_range is not None else (None, None)
        return colorize_depth(value, lo, hi, zero_is_invalid=not prediction)
    return colorize(value)


def picture(
    colorize: Callable,
    value: np.ndarray,
    *,
    prediction: bool = True,
    class_names: Sequence[str] | None = None,
    value_range: tuple[float, float] | None = None,
    key: bool = True,
) -> np.ndarray:
    """The colour picture of one map (a `Task.colorize` function and its decoded map), with its key on
    the right when `key`: legend of the classes present (named by `class_names`), depth colour bar in
    metres, normals colour sphere, or the 0..1 scale of a probability."""
    tile = colorize_map(colorize, value, prediction, value_range)
    if not key:
        return tile
    height = tile.shape[0]
    if colorize is colorize_labels:
        ids = sorted(int(i) for i in np.unique(np.asarray(value)))
        legend = label_legend(ids, class_names, height)
    elif colorize is colorize_depth:
        found = value_range or depth_range(value, zero_is_invalid=not prediction)
        if found is None:
            return tile
        lo, hi = found
        legend = colour_bar(lo, hi, height, lambda v: colorize_depth(v, lo, hi, zero_is_invalid=False), unit="m")
    elif colorize is colorize_normals:
        legend = normals_key(height)
    elif colorize is colorize_probability:
        legend = colour_bar(0.0, 1.0, height, colorize_probability)
    else:
        return tile
    return hstack([tile, legend], gap=max(2, height // 100))


# ---------------------------------------------------------------- grids and panels
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


def fit_height(rgb: np.ndarray, height: int) -> np.ndarray:
    """`rgb` scaled to `height` pixels tall (area averaging to shrink, nearest to enlarge)."""
    if rgb.shape[0] == height:
        return rgb
    width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
    mode = cv2.INTER_AREA if height < rgb.shape[0] else cv2.INTER_NEAREST
    return cv2.resize(rgb, (width, height), interpolation=mode)


def titled_row(pictures: Sequence[np.ndarray], titles: Sequence[str], gap: int | None = None) -> np.ndarray:
    """Pictures of one height side by side on white, each with its title above it."""
    height = pictures[0].shape[0]
    scale, thick, line = text_size(height)
    gap = max(4, height // 40) if gap is None else gap
    title_h = line + line // 3
    body = hstack(pictures, gap=gap)
    out = np.full((title_h + body.shape[0] + gap, body.shape[1] + 2 * gap, 3), 255, dtype=np.uint8)
    out[title_h : title_h + body.shape[0], gap : gap + body.shape[1]] = body
    x = gap
    for p, title in zip(pictures, titles):
        _text(out, title, x + 2, line, scale, thick)
        x += p.shape[1] + gap
    return out


def shrink_map(value: np.ndarray, height: int, labels: bool) -> np.ndarray:
    """A decoded map (H x W or H x W x C) scaled to `height` rows for display: nearest neighbour for
    class maps (and to enlarge), area averaging otherwise."""
    value = np.asarray(value)
    if value.shape[0] == height:
        return value
    width = max(1, round(value.shape[1] * height / value.shape[0]))
    if labels:
        rows = np.minimum((np.arange(height) + 0.5) * value.shape[0] / height, value.shape[0] - 1).astype(np.int64)
        cols = np.minimum((np.arange(width) + 0.5) * value.shape[1] / width, value.shape[1] - 1).astype(np.int64)
        return value[rows][:, cols]
    mode = cv2.INTER_AREA if height < value.shape[0] else cv2.INTER_NEAREST
    return cv2.resize(np.ascontiguousarray(value, dtype=np.float32), (width, height), interpolation=mode)


def prediction_panel(
    image: np.ndarray,
    maps: dict[str, tuple[Callable, np.ndarray]],
    class_names: dict[str, Sequence[str]] | None = None,
    height: int | None = 384,
) -> np.ndarray:
    """One titled row: the RGB input, then for each name its map drawn with its key (`picture`), from
    name -> (a `Task.colorize` function, the decoded prediction), at `height` pixels (None: the input's)."""
    target = image.shape[0] if height is None else int(height)
    tiles = [fit_height(image, target)]
    for name, (colorize, value) in maps.items():
        small = shrink_map(value, target, labels=colorize is colorize_labels)
        tiles.append(picture(colorize, small, prediction=True, class_names=(class_names or {}).get(name)))
    return titled_row(tiles, ["image", *maps])


def save_png(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 picture to `path` as PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
