"""Joint multi-task transforms: one geometric change applied to the image and every target alike.

Each transform maps a raw sample (numpy, see `mtvision.data.sample`) to a new raw sample; the
input is never modified.  `ToSample` ends a pipeline with the tensor contract.  Per-task behaviour
comes from the `Task` records: `pad_value` fills padding, `flip_fn` fixes a target after a
horizontal flip (normals: x negated) and `scale_fn` after a random zoom (depth divided by the
factor).  Targets are resized with centre-aligned nearest neighbour, so label values and invalid
markers (255, 0 depth, zero normals) are never blended; the image is resized bilinearly on the same
pixel grid, so every target pixel keeps the source pixel that the image pixel shows.  A sample's
camera intrinsics (`meta["intrinsics"]`) follow every crop, pad, resize, flip and rotation (see
`mtvision/data/camera.py`).

Random transforms take `seed` (an int, a `np.random.Generator`, or None for fresh entropy).  In a
DataLoader worker each transform re-derives its generator once from its own state and the worker's
seed, so workers never repeat each other's augmentations and runs stay reproducible under a fixed
`torch` seed.

`train_transforms` follows the InvPT / mmseg training pipeline (random scale 0.5-2, random crop with
padding, horizontal flip, photometric distortion, normalise); `eval_transforms` only pads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import albumentations.augmentations.pixel.functional as fpixel
import numpy as np
import torch

from mtvision.cv import cv2
from mtvision.data import camera
from mtvision.data.sample import IMAGENET_MEAN, IMAGENET_STD, to_sample
from mtvision.errors import DatasetError, unknown_name
from mtvision.tasks import IGNORE_INDEX, TASKS, Task

RawSample = dict[str, Any]
Seed = int | np.random.Generator | None
ImageFill = float | Sequence[float]

_NON_TASK_KEYS = ("image", "meta")


# ---------------------------------------------------------------- checks and helpers
def _image(raw: RawSample, where: str) -> np.ndarray:
    image = raw.get("image")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(
            f"{where}: raw sample key 'image' must be an H x W x 3 array, got {getattr(image, 'shape', type(image).__name__)}"
        )
    return image


def _targets(raw: RawSample, where: str) -> list[tuple[str, Task, np.ndarray]]:
    """(name, task, array) for every target of `raw`, checked to match the image size."""
    size = _image(raw, where).shape[:2]
    out = []
    for name, value in raw.items():
        if name in _NON_TASK_KEYS:
            continue
        if name not in TASKS:
            raise unknown_name(f"raw sample key in {where}", name, [*TASKS, *_NON_TASK_KEYS])
        if not isinstance(value, np.ndarray) or value.ndim not in (2, 3):
            raise DatasetError(
                f"{where}: target {name!r} must be an H x W [x C] array, got {getattr(value, 'shape', type(value).__name__)}"
            )
        if value.shape[:2] != size:
            raise DatasetError(f"{where}: target {name!r} has size {value.shape[:2]} but the image has size {size}")
        out.append((name, TASKS[name], value))
    return out


def _meta(raw: RawSample) -> dict[str, Any]:
    return dict(raw.get("meta") or {})


def _positive_size(height: int, width: int, where: str) -> tuple[int, int]:
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"{where}: height and width must be positive integers, got {height} x {width}")
    return int(height), int(width)


def _check_fill(fill: ImageFill, where: str) -> tuple[float, ...]:
    values = np.atleast_1d(np.asarray(fill, dtype=np.float64))
    if values.ndim != 1 or values.size not in (1, 3) or not ((values >= 0) & (values <= 255)).all():
        raise ValueError(f"{where}: image_fill must be one value or three values in [0, 255], got {fill!r}")
    return tuple(float(v) for v in np.broadcast_to(values, (3,)))


def mean_fill(mean: Sequence[float]) -> tuple[float, float, float]:
    """The uint8 RGB colour of a normalisation mean given over [0, 1] pixels (normalises to ~0)."""
    r, g, b = (float(np.clip(np.rint(m * 255.0), 0, 255)) for m in mean)
    return r, g, b


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each of `dst` output pixels, centre-aligned: floor((i + 0.5) * src / dst)."""
    return ((2 * np.arange(dst, dtype=np.int64) + 1) * src) // (2 * dst)


class _Randomized:
    """Holds a transform's generator; re-derived once in every new process (DataLoader worker)."""

    def __init__(self, seed: Seed) -> None:
        self._rng = np.random.default_rng(seed)
        self._pid = os.getpid()

    def reseed(self, seed: Seed | Sequence[int]) -> None:
        """Replace the generator with one from `seed` (e.g. [run seed, epoch, index] per sample)."""
        self._rng = np.random.default_rng(seed)
        self._pid = os.getpid()

    @property
    def rng(self) -> np.random.Generator:
        """The generator for this process."""
        pid = os.getpid()
        if pid != self._pid:
            info = torch.utils.data.get_worker_info()
            salt = int(info.seed) if info is not None else pid
            self._rng = np.random.default_rng([int(self._rng.integers(2**63)), salt])
            self._pid = pid
        return self._rng


# ---------------------------------------------------------------- deterministic operations
def resize(raw: RawSample, height: int, width: int) -> RawSample:
    """`raw` resized to height x width: image bilinear, targets nearest; no per-task value fix-up."""
    height, width = _positive_size(height, width, "resize")
    image = _image(raw, "resize")
    targets = _targets(raw, "resize")
    ys = _nearest_index(image.shape[0], height)[:, None]
    xs = _nearest_index(image.shape[1], width)[None, :]
    out: RawSample = {"image": cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_LINEAR)}
    for name, _, value in targets:
        out[name] = value[ys, xs]
    out["meta"] = camera.with_intrinsics(_meta(raw), lambda K: camera.resize_intrinsics(K, image.shape[:2], (height, width)))
    return out


def rescale(raw: RawSample, factor: float) -> RawSample:
    """`raw` zoomed by `factor` (size rounded), then each task's `scale_fn` (depth / factor)."""
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"rescale: factor must be a positive finite number, got {factor}")
    h, w = _image(raw, "rescale").shape[:2]
    out = resize(raw, max(1, int(np.floor(h * factor + 0.5))), max(1, int(np.floor(w * factor + 0.5))))
    for name, task, value in _targets(out, "rescale"):
        if task.scale_fn is not None:
            out[name] = task.scale_fn(value, float(factor))
    return out


def crop_window(raw: RawSample, top: int, left: int, height: int, width: int, image_fill: ImageFill = 0) -> RawSample:
    """The height x width window of `raw` at (top, left); parts outside the image are padding.

    Padding is `image_fill` for the image and each task's `pad_value` for its target.
    """
    height, width = _positive_size(height, width, "crop_window")
    fill = np.rint(_check_fill(image_fill, "crop_window"))
    image = _image(raw, "crop_window")
    h, w = image.shape[:2]
    y0, y1 = max(top, 0), min(top + height, h)
    x0, x1 = max(left, 0), min(left + width, w)

    def window(value: np.ndarray, pad: Any) -> np.ndarray:
        out = np.empty((height, width, *value.shape[2:]), dtype=value.dtype)
        out[...] = np.asarray(pad).astype(value.dtype)
        if y1 > y0 and x1 > x0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = value[y0:y1, x0:x1]
        return out

    result: RawSample = {"image": window(image, fill)}
    for name, task, value in _targets(raw, "crop_window"):
        result[name] = window(value, task.pad_value)
    result["meta"] = camera.with_intrinsics(_meta(raw), lambda K: camera.crop_intrinsics(K, top, left))
    return result


def rotate_normals(normals: np.ndarray, degrees: float) -> np.ndarray:
    """Normals (H x W x 3) after the image is rotated by `degrees` counter-clockwise: their in-plane
    (x, y) part turned with it, as the MTI-Net release's ScaleNRotate does (x' = x cos a + y sin a,
    y' = y cos a - x sin a); zero vectors (invalid) stay zero."""
    a = np.deg2rad(degrees)
    out = np.array(normals, copy=True)
    x, y = normals[..., 0], normals[..., 1]
    out[..., 0] = x * np.cos(a) + y * np.sin(a)
    out[..., 1] = y * np.cos(a) - x * np.sin(a)
    return out.astype(normals.dtype, copy=False)


ROTATE_FNS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {"normals": rotate_normals}
"""Per-task fix-up of a target's values after an in-plane rotation (by task name)."""


def rotate(raw: RawSample, degrees: float, image_fill: ImageFill = 0) -> RawSample:
    """`raw` rotated by `degrees` counter-clockwise about the image centre (w/2, h/2), keeping its
    size (OpenCV's getRotationMatrix2D / warpAffine, as the MTI-Net release's ScaleNRotate): the
    image bilinear with `image_fill` outside, targets nearest (labels and invalid markers are never
    blended) with each task's `pad_value` outside, then `ROTATE_FNS` (normals turned in-plane)."""
    if not np.isfinite(degrees):
        raise ValueError(f"rotate: degrees must be finite, got {degrees}")
    fill = _check_fill(image_fill, "rotate")
    image = _image(raw, "rotate")
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(degrees), 1.0)
    out: RawSample = {"image": cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                              borderMode=cv2.BORDER_CONSTANT, borderValue=fill)}
    inverse = cv2.invertAffineTransform(matrix)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = np.floor(inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2] + 0.5).astype(np.int64)
    sy = np.floor(inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2] + 0.5).astype(np.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    sx, sy = np.clip(sx, 0, w - 1), np.clip(sy, 0, h - 1)
    for name, task, value in _targets(raw, "rotate"):
        fixed = ROTATE_FNS[name](value, float(degrees)) if name in ROTATE_FNS else value
        warped = fixed[sy, sx]
        warped[~inside] = np.asarray(task.pad_value).astype(value.dtype)
        out[name] = warped
    out["meta"] = camera.with_intrinsics(_meta(raw), lambda K: camera.rotate_intrinsics(K, matrix))
    return out


def hflip(raw: RawSample) -> RawSample:
    """`raw` mirrored left-right, then each task's `flip_fn` (normals: x negated)."""
    out: RawSample = {"image": np.ascontiguousarray(_image(raw, "hflip")[:, ::-1])}
    for name, task, value in _targets(raw, "hflip"):
        flipped = np.ascontiguousarray(value[:, ::-1])
        out[name] = task.flip_fn(flipped) if task.flip_fn is not None else flipped
    out["meta"] = camera.with_intrinsics(_meta(raw), lambda K: camera.hflip_intrinsics(K, out["image"].shape[1]))
    return out


def pad_to(raw: RawSample, height: int, width: int, image_fill: ImageFill = 0) -> RawSample:
    """`raw` padded bottom/right to height x width; meta["valid_size"] = the unpadded (H, W).

    meta["size"] is set to the unpadded size when absent.  Predictions are cropped back with
    `pred[..., :H, :W]`.
    """
    height, width = _positive_size(height, width, "pad_to")
    h, w = _image(raw, "pad_to").shape[:2]
    if h > height or w > width:
        sample = _meta(raw).get("id", "?")
        raise DatasetError(
            f"pad_to: sample {sample!r} of size {h} x {w} is larger than the pad size {height} x {width}"
        )
    out = crop_window(raw, 0, 0, height, width, image_fill)
    out["meta"]["valid_size"] = (h, w)
    out["meta"].setdefault("size", (h, w))
    return out


# ---------------------------------------------------------------- transforms
class RandomScale(_Randomized):
    """Zoom by one factor drawn uniformly from `scale_range`; depth is divided by it."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0), seed: Seed = None) -> None:
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi or not np.isfinite(hi):
            raise ValueError(f"RandomScale: scale_range must satisfy 0 < low <= high, got {scale_range}")
        super().__init__(seed)
        self.scale_range = (lo, hi)

    def __call__(self, raw: RawSample) -> RawSample:
        return rescale(raw, float(self.rng.uniform(*self.scale_range)))

    def __repr__(self) -> str:
        return f"RandomScale(scale_range={self.scale_range})"


class RandomRotation(_Randomized):
    """Rotate by an angle drawn uniformly from [-degrees, degrees] (see `rotate`)."""

    def __init__(self, degrees: float, image_fill: ImageFill = 0, seed: Seed = None) -> None:
        if not 0 <= degrees <= 180:
            raise ValueError(f"RandomRotation: degrees must be in [0, 180], got {degrees}")
        super().__init__(seed)
        self.degrees = float(degrees)
        self.image_fill = _check_fill(image_fill, "RandomRotation")

    def __call__(self, raw: RawSample) -> RawSample:
        return rotate(raw, float(self.rng.uniform(-self.degrees, self.degrees)), self.image_fill)

    def __repr__(self) -> str:
        return f"RandomRotation({self.degrees}, image_fill={self.image_fill})"


CAT_MAX_TRIES = 10
"""Redraws of a random crop whose semseg labels one class dominates (mmseg's and the InvPT / TaskPrompter releases')."""


class RandomCrop(_Randomized):
    """A height x width window at a uniform random position; a smaller image is padded first.

    Where the image is smaller than the window in a dimension, it lands at a uniform random offset
    inside it (pads on both sides, split at random); padding as in `crop_window`.

    With `cat_max_ratio` < 1 (the InvPT / TaskPrompter releases use 0.75) and a `semseg` target, a
    window is redrawn, up to `CAT_MAX_TRIES` times, unless its labelled (non-255) semseg pixels hold
    at least two classes and none covers `cat_max_ratio` or more of them; after the last redraw the
    window is kept unchecked, as in the releases.
    """

    def __init__(self, height: int, width: int, image_fill: ImageFill = 0, seed: Seed = None,
                 cat_max_ratio: float = 1.0) -> None:
        super().__init__(seed)
        self.height, self.width = _positive_size(height, width, "RandomCrop")
        self.image_fill = _check_fill(image_fill, "RandomCrop")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"RandomCrop: cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)

    def _draw(self, h: int, w: int) -> tuple[int, int]:
        top = int(self.rng.integers(min(0, h - self.height), max(0, h - self.height) + 1))
        left = int(self.rng.integers(min(0, w - self.width), max(0, w - self.width) + 1))
        return top, left

    def _varied(self, labels: np.ndarray, top: int, left: int) -> bool:
        window = labels[max(top, 0) : top + self.height, max(left, 0) : left + self.width]
        _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
        return len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()

    def __call__(self, raw: RawSample) -> RawSample:
        h, w = _image(raw, "RandomCrop").shape[:2]
        top, left = self._draw(h, w)
        if self.cat_max_ratio < 1 and "semseg" in raw:
            for _ in range(CAT_MAX_TRIES):
                if self._varied(np.asarray(raw["semseg"]), top, left):
                    break
                top, left = self._draw(h, w)
        return crop_window(raw, top, left, self.height, self.width, self.image_fill)

    def __repr__(self) -> str:
        ratio = f", cat_max_ratio={self.cat_max_ratio}" if self.cat_max_ratio < 1 else ""
        return f"RandomCrop({self.height}, {self.width}, image_fill={self.image_fill}{ratio})"


class PadTo:
    """Pad bottom/right to a fixed height x width (evaluation); records meta["valid_size"]."""

    def __init__(self, height: int, width: int, image_fill: ImageFill = 0) -> None:
        self.height, self.width = _positive_size(height, width, "PadTo")
        self.image_fill = _check_fill(image_fill, "PadTo")

    def __call__(self, raw: RawSample) -> RawSample:
        return pad_to(raw, self.height, self.width, self.image_fill)

    def __repr__(self) -> str:
        return f"PadTo({self.height}, {self.width}, image_fill={self.image_fill})"


class HorizontalFlip(_Randomized):
    """Mirror left-right with probability `p`; normals' x component is negated."""

    def __init__(self, p: float = 0.5, seed: Seed = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"HorizontalFlip: p must be in [0, 1], got {p}")
        super().__init__(seed)
        self.p = float(p)

    def __call__(self, raw: RawSample) -> RawSample:
        return hflip(raw) if self.rng.random() < self.p else dict(raw, meta=_meta(raw))

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class Resize:
    """Deterministic resize to height x width (image bilinear, targets nearest).

    Depth is not rescaled: resizing the whole image keeps the camera's field of view, so every
    pixel still sees the same scene point at the same distance.  (RandomScale followed by a crop
    instead emulates moving the camera, hence its depth / factor.)
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = _positive_size(height, width, "Resize")

    def __call__(self, raw: RawSample) -> RawSample:
        return resize(raw, self.height, self.width)

    def __repr__(self) -> str:
        return f"Resize({self.height}, {self.width})"


class PhotometricDistortion(_Randomized):
    """mmseg / InvPT photometric distortion of the uint8 image; targets pass through untouched.

    In order: brightness (add a uniform delta in +-`brightness_delta`); contrast (multiply by a
    factor from `contrast_range`) either here or last, at random; saturation (multiply HSV S by a
    factor from `saturation_range`); hue (add an integer in +-`hue_delta` to OpenCV's 0-180 hue).
    Each step happens with probability `p`; results are clipped to [0, 255] and truncated to uint8.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 0.5,
        seed: Seed = None,
    ) -> None:
        for label, (lo, hi) in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if not 0 <= lo <= hi:
                raise ValueError(f"PhotometricDistortion: {label} must satisfy 0 <= low <= high, got {(lo, hi)}")
        if brightness_delta < 0 or not 0 <= hue_delta <= 180 or int(hue_delta) != hue_delta:
            raise ValueError(
                f"PhotometricDistortion: need brightness_delta >= 0 and an integer hue_delta in [0, 180], got {brightness_delta}, {hue_delta}"
            )
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"PhotometricDistortion: p must be in [0, 1], got {p}")
        super().__init__(seed)
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)
        self.p = float(p)

    def _apply(self) -> bool:
        return bool(self.rng.random() < self.p)

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        if self._apply():
            return fpixel.multiply_add(image, float(self.rng.uniform(*self.contrast_range)), 0.0)
        return image

    def __call__(self, raw: RawSample) -> RawSample:
        image = _image(raw, "PhotometricDistortion")
        if image.dtype != np.uint8:
            raise DatasetError(f"PhotometricDistortion: raw sample key 'image' must be uint8, got {image.dtype}")
        if self._apply():
            image = fpixel.multiply_add(
                image, 1.0, float(self.rng.uniform(-self.brightness_delta, self.brightness_delta))
            )
        contrast_first = bool(self.rng.integers(2))
        if contrast_first:
            image = self._contrast(image)
        if self._apply():
            factor = float(self.rng.uniform(*self.saturation_range))
            if factor != 1.0:  # the uint8 HSV round trip is lossy: skip it when it would change nothing
                hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
                hsv[..., 1] = fpixel.multiply_add(np.ascontiguousarray(hsv[..., 1]), factor, 0.0)
                image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if self._apply():
            shift = int(self.rng.integers(-self.hue_delta, self.hue_delta + 1))
            image = fpixel.shift_hsv(image, shift, 0, 0)
        if not contrast_first:
            image = self._contrast(image)
        out = dict(raw)
        out["image"] = np.ascontiguousarray(image)
        out["meta"] = _meta(raw)
        return out

    def __repr__(self) -> str:
        return (
            f"PhotometricDistortion(brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
            f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta}, p={self.p})"
        )


class ToSample:
    """Raw sample -> tensor sample (`to_sample`, normalising with mean/std over [0, 1] pixels)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"ToSample: mean and std need three values each, std > 0; got mean={mean}, std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, raw: RawSample) -> dict[str, Any]:
        _targets(raw, "ToSample")
        return to_sample(raw, self.mean, self.std)

    def __repr__(self) -> str:
        return f"ToSample(mean={self.mean}, std={self.std})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        for t in transforms:
            if not callable(t):
                raise TypeError(f"Compose: {t!r} is not callable")
        self.transforms = list(transforms)

    def __call__(self, raw: RawSample) -> Any:
        for t in self.transforms:
            raw = t(raw)
        return raw

    def reseed(self, seed: Sequence[int]) -> None:
        """Derive every random step's generator from `seed` (plus the step's position): the output
        then depends only on the input and `seed`, whatever process or worker runs it."""
        for position, t in enumerate(self.transforms):
            if hasattr(t, "reseed"):
                t.reseed([*seed, position])

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose([\n    {inner}\n])"


# ---------------------------------------------------------------- published pipelines
def train_transforms(
    height: int,
    width: int,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    image_fill: ImageFill | None = None,
    seed: Seed = None,
    rotation: float = 0.0,
    cat_max_ratio: float = 1.0,
) -> Compose:
    """Training pipeline: random scale, random rotation (when `rotation` > 0: uniform in +-rotation
    degrees), random crop (padded) to height x width, flip, photometric, normalise.

    `scale_range=None` skips scaling; `image_fill=None` pads the image with the mean colour;
    `cat_max_ratio` < 1 redraws crops that one semseg class dominates (see `RandomCrop`).
    """
    fill = mean_fill(mean) if image_fill is None else image_fill
    rng = np.random.default_rng(seed)

    def child() -> np.random.Generator:
        return np.random.default_rng(int(rng.integers(2**63)))

    steps: list[Callable[[Any], Any]] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range, seed=child()))
    if rotation > 0:
        steps.append(RandomRotation(rotation, image_fill=fill, seed=child()))
    steps.append(RandomCrop(height, width, image_fill=fill, seed=child(), cat_max_ratio=cat_max_ratio))
    if flip:
        steps.append(HorizontalFlip(0.5, seed=child()))
    if photometric:
        steps.append(PhotometricDistortion(seed=child()))
    steps.append(ToSample(mean, std))
    return Compose(steps)


def eval_transforms(
    height: int,
    width: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    image_fill: ImageFill | None = None,
) -> Compose:
    """Evaluation pipeline: pad bottom/right to height x width (no resizing), normalise."""
    fill = mean_fill(mean) if image_fill is None else image_fill
    return Compose([PadTo(height, width, image_fill=fill), ToSample(mean, std)])
