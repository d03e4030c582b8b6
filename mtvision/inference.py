"""The inference API: `load(name) -> Predictor`; `Predictor.predict(image)` -> dict of numpy maps, and
`Predictor.predict_torch(images)` -> dict of tensors that stay on the model's device.

Inputs `predict` takes (`as_rgb`), one or a list:
    - numpy arrays H x W x 3 (RGB): uint8 0..255, uint16 0..65535, or float in [0, 1];
    - grey images (H x W or H x W x 1): replicated to three channels;
    - RGBA (H x W x 4) and grey + alpha: the alpha channel is dropped, with a warning;
    - PIL images (any mode; EXIF orientation is applied to opened files) and image file paths.

Preprocessing (resize/pad policy, mean/std) comes from the model config.  With `max_size`, an image
whose longer side exceeds it is first shrunk (area averaging) to that longer side, and the maps are
resized back: time and memory then stay bounded for a 12-megapixel photo.  Outputs are at the input
image's size: class maps H x W (int64), depth H x W (metres, as the model predicts them for the
network input; no rescaling for resizes), normals H x W x 3 (unit), boundary and saliency
probabilities H x W (float32).  Large maps are resized and decoded in row strips, so that the full
stack of logits at the photo's size is never held at once.

Controllable models (decoder `controllable`): `budget` (GFLOPs per image at its network input size)
and `preference` (task -> weight) pick the sub-network each forward runs, without retraining
(`select_widths` shows the choice; `mtvision/search/controllable.py` is the search).

Batching: a list of images is run in batches of images whose network inputs have the same size.  A
batched result equals the single-image result up to float32 rounding (about 1e-6 relative), not
bitwise: the convolution kernels (oneDNN on CPU, cuDNN on CUDA) choose a batch-size-dependent order
of accumulation; a class map can therefore differ where two classes' scores tie within that.
`batch_size=1` gives bitwise the single-image results.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mtvision.cv import cv2
from mtvision.errors import MTVisionError
from mtvision.models.config import PreprocessConfig
from mtvision.models.heads import resize_to
from mtvision.models.multitask import MultiTaskModel

if TYPE_CHECKING:
    from mtvision.search.controllable import WidthChoice, WidthFlops

STRIP_ELEMENTS = 1 << 24
"""Maps larger than this many values (e.g. 40 class scores of a 12-megapixel photo) are resized and
decoded in row strips of at most this size."""


class ImageError(MTVisionError, ValueError):
    """An input that is not an image `predict` can take (see the module docstring)."""


class ImageReadError(ImageError):
    """An image file that cannot be read (missing, corrupt or not an image): a failure of the data,
    exit status 1 in the command-line tools, not a usage error."""

    exit_code = 1


def _where(index: int | None) -> str:
    return "image" if index is None else f"image {index}"


def _from_pil(image: Any, where: str) -> np.ndarray:
    """A PIL image as an RGB (or grey/alpha) array for `as_rgb`."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ImageError(f"{where}: 32-bit integer image with values outside 0..65535")
        return array.astype(np.uint16)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        warnings.warn(f"{where} has an alpha channel ({mode}); it is dropped", UserWarning, stacklevel=4)
        return np.asarray(image.convert("RGBA" if mode != "LA" else "LA"))[..., :-1]
    return np.asarray(image.convert("RGB"))


def _open(path: str | os.PathLike, where: str) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise ImageError(f"{where}: no image file {str(path)!r}")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return _from_pil(image, f"{where} ({path.name})")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(f"{where}: cannot read {str(path)!r} as an image ({exc})") from None


def as_rgb(image: object, index: int | None = None) -> np.ndarray:
    """An H x W x 3 RGB array, uint8 or float32 in [0, 1], from any input `predict` takes."""
    where = _where(index)
    if isinstance(image, torch.Tensor):
        raise ImageError(f"{where} is a torch tensor: use Predictor.predict_torch (N x 3 x H x W or 3 x H x W)")
    if isinstance(image, (str, os.PathLike)):
        image = _open(image, where)
    elif type(image).__module__.startswith("PIL."):
        image = _from_pil(image, where)
    if not isinstance(image, np.ndarray):
        raise ImageError(
            f"{where} must be a numpy array (H x W x 3 RGB), a PIL image or an image path, got {type(image).__name__}"
        )
    if image.ndim == 3 and image.shape[2] in (2, 4):
        warnings.warn(f"{where} has {image.shape[2]} channels (alpha last); the alpha channel is dropped",
                      UserWarning, stacklevel=3)
        image = image[..., :-1]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ImageError(f"{where} must be H x W x 3 RGB (or grey H x W, or RGBA), got shape {image.shape}"
                         + ("; pass a batch as a list of images" if image.ndim == 4 else ""))
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{where} is empty (shape {image.shape})")
    if image.dtype == np.uint8:
        pass
    elif image.dtype == np.uint16:
        image = image.astype(np.float32) / np.float32(65535.0)
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32, copy=False)
        lo, hi = float(np.min(image)), float(np.max(image))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ImageError(
                f"{where}: float images must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]; for 0..255 values "
                "use img.astype(np.uint8)"
            )
    else:
        raise ImageError(f"{where} has dtype {image.dtype}; give uint8 (0..255), uint16 or float in [0, 1]")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def check_image(image: object, index: int | None = None) -> np.ndarray:
    """`as_rgb` (kept for callers of the earlier name)."""
    return as_rgb(image, index)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An `as_rgb` array as uint8 RGB, for pictures."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def shrunk_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the longer side at most `max_size`, aspect ratio kept (unchanged when it already fits)."""
    if max_size is None or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class Prepared:
    """A preprocessed image: network input (3 x h x w), its unpadded region and the output size."""

    tensor: torch.Tensor
    valid: tuple[int, int]
    size: tuple[int, int]


def preprocess(image: np.ndarray, cfg: PreprocessConfig, max_size: int | None = None) -> Prepared:
    """Resize/pad and normalise one `as_rgb` image (uint8, or float32 in [0, 1]) according to `cfg`;
    first shrink it to `max_size` on the longer side when it is larger (maps come back at its size)."""
    h, w = image.shape[:2]
    sh, sw = shrunk_size(h, w, max_size)
    if (sh, sw) != (h, w):
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
    if cfg.mode == "stretch":
        th, tw = cfg.input_size
        resized = cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR) if (th, tw) != (sh, sw) else image
        target = (th, tw)
    elif cfg.mode == "letterbox":
        th, tw = cfg.input_size
        scale = min(th / sh, tw / sw)
        nh, nw = max(1, min(th, round(sh * scale))), max(1, min(tw, round(sw * scale)))
        resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (sh, sw) else image
        target = (th, tw)
    else:
        d = cfg.size_divisor
        resized = image
        target = (math.ceil(sh / d) * d, math.ceil(sw / d) * d)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    unit = resized.astype(np.float32) / 255.0 if resized.dtype == np.uint8 else resized.astype(np.float32)
    norm = (unit - mean) / std
    vh, vw = norm.shape[:2]
    out = np.zeros((3, *target), dtype=np.float32)
    out[:, :vh, :vw] = norm.transpose(2, 0, 1)
    return Prepared(torch.from_numpy(out), (vh, vw), (h, w))


def upsample_decode(
    raw: torch.Tensor, size: Sequence[int], decode: Callable[[torch.Tensor], torch.Tensor], max_elements: int = STRIP_ELEMENTS
) -> torch.Tensor:
    """`decode(resize_to(raw, size))` for N x C x h x w raw maps, computed in row strips when the resized
    maps would hold more than `max_elements` values (equal up to float rounding: the strips interpolate
    rows then columns, where `F.interpolate` weighs both at once)."""
    n, c, h, w = raw.shape
    height, width = int(size[0]), int(size[1])
    if (h, w) == (height, width) or n * c * height * width <= max_elements:
        return decode(resize_to(raw, (height, width)))
    rows = max(1, max_elements // (n * c * width))
    out: torch.Tensor | None = None
    scale = h / height
    for y0 in range(0, height, rows):
        y = torch.arange(y0, min(height, y0 + rows), device=raw.device, dtype=torch.float32)
        src = ((y + 0.5) * scale - 0.5).clamp_min(0.0)
        lo = src.floor().long().clamp_max(h - 1)
        hi = (lo + 1).clamp_max(h - 1)
        weight = (src - lo.float()).view(1, 1, -1, 1).to(raw.dtype)
        strip = raw[:, :, lo] * (1.0 - weight) + raw[:, :, hi] * weight
        strip = F.interpolate(strip, size=(strip.shape[2], width), mode="bilinear", align_corners=False)
        decoded = decode(strip)
        if out is None:
            out = decoded.new_empty((*decoded.shape[:-2], height, width))
        out[..., y0 : y0 + decoded.shape[-2], :] = decoded
    assert out is not None
    return out


class Predictor:
    """Runs a `MultiTaskModel` on images and returns decoded maps at the input size.

    Args:
        model: the model (put in eval mode).
        device: where to run (default: the model's device).
        amp: bf16 autocast on CUDA (ignored on CPU).
        batch_size: images per forward when `predict` gets a list (see the module docstring on batching).
        channels_last: convert inputs to channels-last memory format.
        max_size: default `max_size` of `predict` / `predict_torch` (None: images run at their size).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        device: str | torch.device | None = None,
        amp: bool = False,
        batch_size: int = 4,
        channels_last: bool = False,
        max_size: int | None = None,
    ):
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.amp = bool(amp) and self.device.type == "cuda"
        self.batch_size = int(batch_size)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.preprocess_config = model.config.preprocess
        self.max_size = _check_max_size(max_size)
        self._width_tables: dict[tuple[int, int], WidthFlops] = {}  # controllable models: FLOPs per input size

    @property
    def tasks(self) -> list[str]:
        return self.model.task_names

    @property
    def class_names(self) -> dict[str, tuple[str, ...]]:
        """Task -> class names, for the label-map tasks whose class count is a known dataset's
        (`mtvision/data/class_names.py`)."""
        from mtvision.data.class_names import known_class_names

        found = {t: known_class_names(t, task.out_channels) for t, task in self.model.tasks.items() if task.is_label_map}
        return {t: names for t, names in found.items() if names is not None}

    # ------------------------------------------------------------------ numpy / PIL / paths
    def predict(
        self, image: Any, tasks: Sequence[str] | None = None, max_size: int | None = None, *,
        budget: float | None = None, preference: Mapping[str, float] | None = None,
    ) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        """Predict `tasks` (default all) for one image (-> dict) or a list of images (-> list of dicts).

        `image`: any input of the module docstring.  `max_size`: shrink images whose longer side is
        larger to that side first (default: the predictor's `max_size`).  `budget` (GFLOPs per image)
        and `preference` (task -> weight): run the sub-network `select_widths` picks (controllable
        models only).
        """
        control = self._control(budget, preference)
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            return []
        names = self.model.select_tasks(tasks)
        limit = self.max_size if max_size is None else _check_max_size(max_size)
        prepared = [
            preprocess(as_rgb(im, None if single else i), self.preprocess_config, limit) for i, im in enumerate(images)
        ]
        results: list[dict[str, np.ndarray] | None] = [None] * len(prepared)
        # batch images whose network inputs have the same size
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(tuple(p.tensor.shape), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                batch = torch.stack([prepared[i].tensor for i in chunk])
                with self._widths(control, batch.shape[-2:]):
                    outputs = self._forward(batch, names)
                for j, i in enumerate(chunk):
                    maps = self._decode({t: o[j : j + 1] for t, o in outputs.items()}, prepared[i].valid, prepared[i].size)
                    results[i] = {t: _to_numpy(self.model.tasks[t].is_label_map, m[0]) for t, m in maps.items()}
        return results[0] if single else results

    # ------------------------------------------------------------------ tensors
    def predict_torch(
        self, images: torch.Tensor, tasks: Sequence[str] | None = None, max_size: int | None = None, *,
        budget: float | None = None, preference: Mapping[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict for a tensor of images (N x 3 x H x W, or 3 x H x W for one image; uint8 0..255 or
        float in [0, 1]; RGB) on the model's device, returning what each task's `decode` gives, at the
        input size, on that device: class maps N x H x W (int64), other maps N x C x H x W (float32);
        without the batch axis for a 3 x H x W input.

        Resizing (`max_size`, letterbox and stretch modes) uses torch's interpolation (area, bilinear),
        so resized results can differ slightly from `predict`'s OpenCV resizing; without resizing
        (pad mode, images within `max_size`) they equal `predict`'s.
        `budget` and `preference` as in `predict`.
        """
        control = self._control(budget, preference)
        if not isinstance(images, torch.Tensor):
            raise ImageError(f"predict_torch takes a torch tensor, got {type(images).__name__}; use predict")
        single = images.ndim == 3
        x = images[None] if single else images
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0 or min(x.shape[-2:]) == 0:
            raise ImageError(f"images must be N x 3 x H x W or 3 x H x W RGB, got shape {tuple(images.shape)}")
        names = self.model.select_tasks(tasks)
        limit = self.max_size if max_size is None else _check_max_size(max_size)
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            x = x.float()
            lo, hi = torch.aminmax(x)
            if not (0.0 <= float(lo) and float(hi) <= 1.0):
                raise ImageError(f"float images must hold values in [0, 1], got [{float(lo):.4g}, {float(hi):.4g}]")
        else:
            raise ImageError(f"images have dtype {x.dtype}; give uint8 (0..255) or float in [0, 1]")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        batch, valid = self._preprocess_torch(x, limit)
        chunks: list[dict[str, torch.Tensor]] = []
        for start in range(0, batch.shape[0], self.batch_size):
            with self._widths(control, batch.shape[-2:]):
                outputs = self._forward(batch[start : start + self.batch_size], names)
            chunks.append(self._decode(outputs, valid, size))
        result = {t: torch.cat([c[t] for c in chunks]) for t in names}
        return {t: v[0] for t, v in result.items()} if single else result

    def _preprocess_torch(self, x: torch.Tensor, max_size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
        cfg = self.preprocess_config
        h, w = x.shape[-2:]
        sh, sw = shrunk_size(h, w, max_size)
        if (sh, sw) != (h, w):
            x = F.interpolate(x, size=(sh, sw), mode="area")
        if cfg.mode == "stretch":
            target = tuple(cfg.input_size)
            x = x if (sh, sw) == target else F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        elif cfg.mode == "letterbox":
            th, tw = cfg.input_size
            scale = min(th / sh, tw / sw)
            nh, nw = max(1, min(th, round(sh * scale))), max(1, min(tw, round(sw * scale)))
            x = x if (nh, nw) == (sh, sw) else F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
            target = (th, tw)
        else:
            d = cfg.size_divisor
            target = (math.ceil(sh / d) * d, math.ceil(sw / d) * d)
        mean = torch.tensor(cfg.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x - mean) / std
        valid = (int(x.shape[-2]), int(x.shape[-1]))
        x = F.pad(x, (0, target[1] - valid[1], 0, target[0] - valid[0]))
        return x, valid

    # ------------------------------------------------------------------ shared
    def select_widths(
        self, budget: float | None = None, preference: Mapping[str, float] | None = None,
        input_size: Sequence[int] | None = None,
    ) -> WidthChoice:
        """The sub-network of a controllable model for `budget` GFLOPs per image (None: no limit) and
        a task `preference` (None: equal), for network inputs of `input_size` (H, W; default: the
        preprocessing's `input_size`)."""
        from mtvision.search.controllable import controllable_decoder, measure_widths, search_widths

        controllable_decoder(self.model)
        size = input_size if input_size is not None else self.preprocess_config.input_size
        if size is None:
            raise ValueError("select_widths needs input_size (H, W): this model's preprocessing has no fixed size")
        key = (int(size[0]), int(size[1]))
        if key not in self._width_tables:
            self._width_tables[key] = measure_widths(self.model, key)
        table = self._width_tables[key]
        flops = table.flops(table.widest()) if budget is None else _check_budget(budget) * 1e9
        return search_widths(table, flops, preference)

    def _control(self, budget: float | None, preference: Mapping[str, float] | None) -> tuple | None:
        """(budget, preference) checked before any work, or None when neither is given."""
        if budget is None and preference is None:
            return None
        from mtvision.search.controllable import controllable_decoder, normalise_preference

        controllable_decoder(self.model)
        normalise_preference(preference, self.tasks)
        return (None if budget is None else _check_budget(budget), preference)

    def _widths(self, control: tuple | None, size: Sequence[int]) -> contextlib.AbstractContextManager:
        """The sub-network context for network inputs of `size` (a null context without constraints)."""
        if control is None:
            return contextlib.nullcontext()
        from mtvision.models.decoders.controllable import use_config

        return use_config(self.select_widths(*control, input_size=size).config)

    def _forward(self, batch: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            out = self.model(batch, names).predictions
        return {t: out[t].float() for t in names}

    def _decode(
        self, outputs: dict[str, torch.Tensor], valid: tuple[int, int], size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        vh, vw = valid
        with torch.inference_mode():
            return {
                name: upsample_decode(raw[:, :, :vh, :vw], size, self.model.tasks[name].decode)
                for name, raw in outputs.items()
            }


def _to_numpy(is_label_map: bool, decoded: torch.Tensor) -> np.ndarray:
    """One image's decoded map (H x W, or C x H x W) as the numpy layout of the module docstring."""
    array = decoded.cpu().numpy()
    if is_label_map:
        return array.astype(np.int64, copy=False)
    if array.shape[0] == 1:
        return np.ascontiguousarray(array[0], dtype=np.float32)
    return np.ascontiguousarray(array.transpose(1, 2, 0), dtype=np.float32)


def _check_budget(budget: float) -> float:
    from mtvision.search.controllable import WidthBudgetError

    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) or not (
        math.isfinite(budget) and budget > 0
    ):
        raise WidthBudgetError(f"budget must be a positive number of GFLOPs per image, got {budget!r}")
    return float(budget)


def _check_max_size(max_size: int | None) -> int | None:
    if max_size is None:
        return None
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ImageError(f"max_size must be a positive number of pixels, got {max_size!r}")
    return int(max_size)


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    amp: bool = False,
    batch_size: int = 4,
    channels_last: bool = False,
    max_size: int | None = None,
) -> Predictor:
    """A `Predictor` for a pretrained folder (`config.json` + `model.safetensors`) or `hf-hub:org/name`
    (resolved through the Hugging Face hub cache; see `mtvision/models/pretrained.py`)."""
    from mtvision.models.pretrained import load_model

    return Predictor(
        load_model(name_or_path), device=device, amp=amp, batch_size=batch_size, channels_last=channels_last,
        max_size=max_size,
    )
