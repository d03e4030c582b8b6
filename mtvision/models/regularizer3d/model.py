"""`ThreeDAwareModel`: any multi-task model plus the 3D-aware regulariser, which runs in training only.

The regulariser (Li et al., ICLR 2024) projects the decoder's shared representation (the
`ModelOutput.shared` tensors, resized to the finest of them and concatenated) with a 1 x 1
convolution into a tri-plane: three C-channel feature planes spanning the box that holds each
camera's view frustum between `near` and `far`.  A ray is cast through every cell of that grid with
the sample's camera intrinsics; at `samples` depths along it the tri-plane is sampled (bilinear, the
three planes summed), a shared MLP gives a density and one MLP per task the task's raw output, and
volume rendering composites them into one prediction per pixel and task (depth: the expected
termination depth).  The rendered maps join the model's `deep_supervision`, so each is supervised by
its task's own loss, with the task's loss weight, and reaches the optimiser through the same
weighting and calibration as the task.

In eval mode the wrapper returns the wrapped decoder's output untouched and never runs the
regulariser's modules, and `save_pretrained` writes the plain model, so a trained model costs at
inference exactly what the decoder alone costs.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import MTVisionError
from mtvision.models import saving
from mtvision.models.config import ModelConfig
from mtvision.models.decoders.base import ModelOutput, MultiTaskDecoder
from mtvision.models.multitask import MultiTaskModel
from mtvision.models.regularizer3d import rendering
from mtvision.models.regularizer3d.config import Regularizer3DConfig
from mtvision.tasks import Task

PROBE_SIZE = (64, 64)
"""Input size of the forward that finds the shared representation's channels when the config has no
`input_size` (and the regulariser no `in_channels`)."""


class IntrinsicsError(MTVisionError, ValueError):
    """The 3D-aware regulariser was asked to train without camera intrinsics."""


def missing_intrinsics(where: str) -> IntrinsicsError:
    return IntrinsicsError(
        f"{where}: the 3D-aware regulariser (model.regularizer3d) needs each training sample's camera intrinsics "
        "(meta['intrinsics'], a 3 x 3 camera matrix) and this batch has none. The synthetic scenes and NYUD-v2 "
        "(425 x 560 and 480 x 640 images) provide them; for a dataset without them (PASCAL-Context), assume a camera "
        "with data.assumed_hfov (degrees), add them to its samples' meta, or set model.regularizer3d: null"
    )


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs))


class ThreeDAwareRegularizer(nn.Module):
    """Shared features + cameras -> rendered per-task maps (see the module docstring)."""

    def __init__(self, in_channels: int, tasks: Mapping[str, Task], options: Regularizer3DConfig) -> None:
        super().__init__()
        self.options = copy.deepcopy(options)
        c, hidden = options.channels, options.hidden
        self.project = nn.Conv2d(in_channels, 3 * c, kernel_size=1)
        self.density = _mlp(c, hidden, 1)
        self.heads = nn.ModuleDict(
            {n: _mlp(c, hidden, t.out_channels) for n, t in tasks.items() if not self._depth_from_density(n)}
        )

    def _depth_from_density(self, task: str) -> bool:
        return task == "depth" and self.options.depth_from_density

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters of `task`'s MLP (none for a depth rendered from the density)."""
        return self.heads[task].parameters() if task in self.heads else iter(())

    def forward(self, features: Sequence[Tensor], intrinsics: Tensor, image_size: Sequence[int],
                tasks: Sequence[str]) -> dict[str, Tensor]:
        """task -> N x C x h x w rendered raw prediction, on the image-covering grid of the finest
        feature map's stride (`render_grid`)."""
        o = self.options
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        x = torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                       for f in features], dim=1)
        n, (h, w) = x.shape[0], size
        planes = self.project(x).view(n, 3, o.channels, h, w)
        cams = intrinsics.float()
        rh, rw = render_grid(image_size, (h, w))
        dirs = rendering.pixel_rays(cams, image_size, (rh, rw)).reshape(n, rh * rw, 1, 3)
        depths = rendering.sample_depths(o.near, o.far, o.samples, (n, rh * rw), o.stratified and self.training,
                                         device=x.device, dtype=torch.float32)
        low, high = rendering.frustum_box(cams, image_size, o.near, o.far)
        coords = rendering.normalise_points(dirs * depths.unsqueeze(-1), low, high)  # N x R x S x 3
        feats = rendering.sample_triplane(planes.float(), coords.reshape(n, -1, 3)).view(n, rh * rw, o.samples, o.channels)
        sigma = F.softplus(self.density(feats).squeeze(-1).float())
        weights = rendering.render_weights(sigma, depths)  # N x R x S
        out = {}
        for task in tasks:
            if self._depth_from_density(task):
                value = (weights * depths).sum(dim=-1, keepdim=True)
            else:
                value = rendering.composite(weights, self.heads[task](feats).float())
            out[task] = value.transpose(1, 2).reshape(n, -1, rh, rw)
        return out


def render_grid(image_size: Sequence[int], feature_size: Sequence[int]) -> tuple[int, int]:
    """The grid the rays are cast on: the feature map's stride s (a decoder that pads its input makes
    maps that cover more than the image) laid over the image itself, ceil(H / s) x ceil(W / s) cells
    that tile the H x W image exactly (as a bilinear resize to it reads them)."""
    (height, width), (h, w) = image_size, feature_size
    stride = max(1, round(max(height / h, width / w)))
    return math.ceil(height / stride), math.ceil(width / stride)


class ThreeDAwareModel(MultiTaskModel):
    """A `MultiTaskModel` whose training forward also renders every task from a tri-plane built from
    the shared representation, with the cameras `intrinsics` (N x 3 x 3), and returns the rendered
    maps as one more deep-supervision prediction per task.  In eval mode: the plain model.

    Built by `create_model` when the config sets `regularizer3d`.
    """

    needs_intrinsics = True

    def __init__(self, config: ModelConfig, decoder: MultiTaskDecoder) -> None:
        if config.regularizer3d is None:
            raise ValueError("ThreeDAwareModel needs a config with regularizer3d set")
        super().__init__(config, decoder)
        options = config.regularizer3d
        channels = options.in_channels if options.in_channels is not None else self._shared_channels()
        self.regularizer3d = ThreeDAwareRegularizer(channels, self.tasks, options)

    def _shared_channels(self) -> int:
        """Channels of the shared representation, from one forward of zeros (eval mode, no gradients,
        random state untouched)."""
        size = self.config.preprocess.input_size or PROBE_SIZE
        was_training = self.decoder.training
        param = next(self.decoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            self.decoder.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                out = self.decoder(torch.zeros(1, 3, *size, device=device), self.task_names)
        finally:
            self.decoder.train(was_training)
        maps = [f for f in out.shared if f.ndim == 4]
        if not maps:
            raise ValueError(
                f"the 3D-aware regulariser projects the decoder's shared representation, and decoder "
                f"{self.config.decoder!r} has none (ModelOutput.shared holds no N x C x H x W map)"
            )
        return sum(int(f.shape[1]) for f in maps)

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None, intrinsics: Tensor | None = None) -> ModelOutput:
        out = super().forward(images, tasks)
        if not self.training:
            return out
        if intrinsics is None:
            raise missing_intrinsics("ThreeDAwareModel.forward in training mode")
        if intrinsics.shape != (images.shape[0], 3, 3):
            raise ValueError(f"intrinsics must be N x 3 x 3 for {images.shape[0]} images, got shape {tuple(intrinsics.shape)}")
        maps = [f for f in out.shared if f.ndim == 4]
        if not maps:
            raise ValueError(f"the 3D-aware regulariser needs the decoder's shared representation; decoder {self.config.decoder!r} returned none")
        names = self.select_tasks(tasks)
        rendered = self.regularizer3d(maps, intrinsics.to(images.device), images.shape[-2:], names)
        deep = {t: list(v) for t, v in out.deep_supervision.items()}
        for t in names:
            deep.setdefault(t, []).append(rendered[t])
        return out._replace(deep_supervision=deep)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The decoder's parameters of `task` and the regulariser's MLP of `task`."""
        return itertools.chain(super().task_parameters(task), self.regularizer3d.task_parameters(task))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The decoder's shared parameters, the tri-plane projection and the density MLP."""
        owned = {id(p) for t in self.tasks for p in self.regularizer3d.task_parameters(t)}
        extra = (p for p in self.regularizer3d.parameters() if id(p) not in owned)
        return itertools.chain(self.decoder.shared_parameters(), extra)

    def inference_model(self) -> MultiTaskModel:
        """The plain model (the same decoder, sharing its parameters) with the regulariser dropped."""
        config = copy.deepcopy(self.config)
        config.regularizer3d = None
        return MultiTaskModel(config, self.decoder).train(self.training)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the plain model (`inference_model`) as a pretrained folder: the regulariser is a
        training-time device and is not part of it."""
        saving.save_pretrained(self.inference_model(), directory)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the plain model (`inference_model`) to the Hugging Face hub."""
        return saving.push_to_hub(self.inference_model(), repo_id, **kwargs)
