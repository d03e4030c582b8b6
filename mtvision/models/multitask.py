"""`MultiTaskModel`: a decoder (with its backbones) behind the model contract of `decoders/base.py`."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtvision.errors import unknown_name
from mtvision.models import saving
from mtvision.models.config import ModelConfig
from mtvision.models.decoders.base import ModelOutput, MultiTaskDecoder
from mtvision.models.heads import resize_to


class MultiTaskModel(nn.Module):
    """Images -> `ModelOutput`: raw per-task predictions (logits, depth, unnormalised normals) at
    the input size, plus deep supervision, regularizers, the shared representation, branch points
    and statistics (see `mtvision/models/decoders/base.py`).

    `forward(images, tasks=None)` runs all tasks, or only what the listed tasks need.  Built by
    `create_model`.
    """

    def __init__(self, config: ModelConfig, decoder: MultiTaskDecoder):
        super().__init__()
        self.decoder = decoder
        self.tasks = decoder.tasks
        self.config = copy.deepcopy(config)
        # record resolved class counts so the folder does not depend on registry defaults
        self.config.tasks = {n: (t.out_channels if t.is_label_map else None) for n, t in self.tasks.items()}

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def select_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        """Validate a task selection (None = all tasks, in model order)."""
        if tasks is None:
            return self.task_names
        if isinstance(tasks, str):
            tasks = [tasks]
        for t in tasks:
            if t not in self.tasks:
                raise unknown_name("task of this model", t, self.tasks)
        if not tasks:
            raise ValueError("tasks must name at least one task (or be None for all)")
        return list(dict.fromkeys(tasks))

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> ModelOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be N x 3 x H x W, got shape {tuple(images.shape)}")
        names = self.select_tasks(tasks)
        out = self.decoder(images, names)
        size = images.shape[-2:]
        return out._replace(predictions={t: resize_to(v, size) for t, v in out.predictions.items()})

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss can reach (backbone, neck, mixing units)."""
        return self.decoder.shared_parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters only `task`'s output depends on (its head)."""
        if task not in self.tasks:
            raise unknown_name("task of this model", task, self.tasks)
        return self.decoder.task_parameters(task)

    def state_scalars(self) -> dict[str, float]:
        """The decoder's statistics of its own parameters, for the loggers."""
        return self.decoder.state_scalars()

    # ------------------------------------------------------------------ pretrained folders
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` as the folder `directory`, atomically (see
        `mtvision/models/saving.py`); load it back with `mtvision.load` or `mtvision.models.load_model`."""
        saving.save_pretrained(self, directory)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the pretrained folder to the Hugging Face hub (needs huggingface_hub)."""
        return saving.push_to_hub(self, repo_id, **kwargs)
