"""`MultiTaskModel`: a decoder (with its backbones) plus the model contract of DESIGN.md."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtvision.errors import unknown_name
from mtvision.models.config import ModelConfig
from mtvision.models.decoders.base import MultiTaskDecoder
from mtvision.models.heads import resize_to


class MultiTaskModel(nn.Module):
    """Images -> dict of raw per-task outputs (logits, depth, unnormalised normals) at input size.

    `forward(images, tasks=None)` runs all tasks, or only what the listed tasks need.  Extra keys a
    decoder returns (deep supervision: `aux`) pass through unchanged.  Built by `create_model`.
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

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be N x 3 x H x W, got shape {tuple(images.shape)}")
        names = self.select_tasks(tasks)
        raw = self.decoder(images, names)
        size = images.shape[-2:]
        return {k: (resize_to(v, size) if k in self.tasks else v) for k, v in raw.items()}

    def shared_representation(self) -> list[Tensor]:
        """Tensors of the last forward that every task's loss flows through (see the decoder's docs)."""
        return self.decoder.shared_representation()

    def branch_representation(self) -> list[Tensor]:
        """Tensors of the last forward where the shared part splits into branches (FULLER calibration)."""
        return self.decoder.branch_representation()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss can reach (backbone, neck, mixing units)."""
        return self.decoder.shared_parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters only `task`'s output depends on (its head)."""
        if task not in self.tasks:
            raise unknown_name("task of this model", task, self.tasks)
        return self.decoder.task_parameters(task)

    # ------------------------------------------------------------------ pretrained folders
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` into `directory` (atomically)."""
        from mtvision.models.pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | None = None) -> MultiTaskModel:
        """Load a folder written by `save_pretrained` (or a hub repo id when huggingface_hub is installed)."""
        from mtvision.models.pretrained import load_model

        return load_model(name_or_path, device=device)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the pretrained folder to the Hugging Face hub (needs huggingface_hub)."""
        from mtvision.models.pretrained import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
