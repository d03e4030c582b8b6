"""The inference API: `load(folder) -> Predictor`, `Predictor.predict(image) -> dict of numpy maps`.

Preprocessing (resize/pad policy, mean/std) comes from the model config.  Outputs are at the input
image's size: class maps H x W (int64), depth H x W (metres, as the model predicts it for the
network input; no rescaling for resizes), normals H x W x 3 (unit), boundary and saliency
probabilities H x W (float32).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mtvision.cv import cv2
from mtvision.errors import MTVisionError
from mtvision.models.config import PreprocessConfig
from mtvision.models.heads import resize_to
from mtvision.models.multitask import MultiTaskModel


class ImageError(MTVisionError, ValueError):
    """An input image that is not an H x W x 3 uint8 RGB array."""


def check_image(image: object, index: int | None = None) -> np.ndarray:
    """Return `image` if it is a non-empty H x W x 3 uint8 array, else raise ImageError."""
    where = "image" if index is None else f"image {index}"
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{where} must be a numpy array (H x W x 3 uint8 RGB), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(
            f"{where} must have dtype uint8 (0..255 RGB), got {image.dtype}; convert float images with (img * 255).astype(np.uint8)"
        )
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ImageError(
            f"{where} is grayscale (shape {image.shape}); give H x W x 3 RGB, e.g. np.repeat(img[..., None], 3, -1)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        extra = " (RGBA? drop the alpha channel: img[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise ImageError(f"{where} must be H x W x 3 RGB, got shape {image.shape}{extra}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{where} is empty (shape {image.shape})")
    return image


@dataclass(frozen=True)
class Prepared:
    """A preprocessed image: network input (3 x h x w), its unpadded region and the original size."""

    tensor: torch.Tensor
    valid: tuple[int, int]
    size: tuple[int, int]


def preprocess(image: np.ndarray, cfg: PreprocessConfig) -> Prepared:
    """Resize/pad and normalise one RGB uint8 image according to `cfg`."""
    h, w = image.shape[:2]
    if cfg.mode == "stretch":
        th, tw = cfg.input_size
        resized = cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR) if (th, tw) != (h, w) else image
        target = (th, tw)
    elif cfg.mode == "letterbox":
        th, tw = cfg.input_size
        scale = min(th / h, tw / w)
        nh, nw = max(1, min(th, round(h * scale))), max(1, min(tw, round(w * scale)))
        resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else image
        target = (th, tw)
    else:
        d = cfg.size_divisor
        resized = image
        target = (math.ceil(h / d) * d, math.ceil(w / d) * d)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    norm = (resized.astype(np.float32) / 255.0 - mean) / std
    vh, vw = norm.shape[:2]
    out = np.zeros((3, *target), dtype=np.float32)
    out[:, :vh, :vw] = norm.transpose(2, 0, 1)
    return Prepared(torch.from_numpy(out), (vh, vw), (h, w))


class Predictor:
    """Runs a `MultiTaskModel` on numpy images and returns decoded numpy maps at the input size.

    Args:
        model: the model (put in eval mode).
        device: where to run (default: the model's device).
        amp: bf16 autocast on CUDA (ignored on CPU).
        batch_size: images per forward when `predict` gets a list.
        channels_last: convert inputs to channels-last memory format.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        device: str | torch.device | None = None,
        amp: bool = False,
        batch_size: int = 4,
        channels_last: bool = False,
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

    @property
    def tasks(self) -> list[str]:
        return self.model.task_names

    def predict(
        self, image: np.ndarray | Sequence[np.ndarray], tasks: Sequence[str] | None = None
    ) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        """Predict `tasks` (default all) for one image (-> dict) or a list of images (-> list of dicts)."""
        single = isinstance(image, np.ndarray)
        images = [image] if single else list(image)
        if not single and not images:
            return []
        names = self.model.select_tasks(tasks)
        prepared = [
            preprocess(check_image(im, None if single else i), self.preprocess_config) for i, im in enumerate(images)
        ]
        results: list[dict[str, np.ndarray] | None] = [None] * len(prepared)
        # batch images whose network inputs have the same size, so results do not depend on batching
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(tuple(p.tensor.shape), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                outputs = self._forward(torch.stack([prepared[i].tensor for i in chunk]), names)
                for j, i in enumerate(chunk):
                    results[i] = self._postprocess({t: o[j : j + 1] for t, o in outputs.items()}, prepared[i])
        return results[0] if single else results

    def _forward(self, batch: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            out = self.model(batch, names).predictions
        return {t: out[t].float() for t in names}

    def _postprocess(self, outputs: dict[str, torch.Tensor], prep: Prepared) -> dict[str, np.ndarray]:
        vh, vw = prep.valid
        result = {}
        with torch.inference_mode():
            for name, raw in outputs.items():
                task = self.model.tasks[name]
                raw = resize_to(raw[:, :, :vh, :vw], prep.size)
                decoded = task.decode(raw)[0].cpu().numpy()
                if task.is_label_map:
                    result[name] = decoded.astype(np.int64)
                elif decoded.shape[0] == 1:
                    result[name] = np.ascontiguousarray(decoded[0], dtype=np.float32)
                else:
                    result[name] = np.ascontiguousarray(decoded.transpose(1, 2, 0), dtype=np.float32)
        return result


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    amp: bool = False,
    batch_size: int = 4,
    channels_last: bool = False,
) -> Predictor:
    """A `Predictor` for a pretrained folder (`config.json` + `model.safetensors`)."""
    from mtvision.models.pretrained import load_model

    return Predictor(
        load_model(name_or_path), device=device, amp=amp, batch_size=batch_size, channels_last=channels_last
    )
