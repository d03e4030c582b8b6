"""Release-shaped state dicts for the converter tests: the key manifests in `manifests/` (key names
and shapes of each release's `state_dict`, recorded from the authors' builders) filled with random
values or meta tensors."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from mtvision.models.config import ModelConfig
from mtvision.models.registry import build_model

MANIFESTS = Path(__file__).parent / "manifests"


def load_manifest(name: str) -> dict:
    """The manifest `manifests/<name>.json`: {"keys": [[key, shape], ...], ...}."""
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def release_state(
    manifest: Mapping, device: str = "meta", seed: int = 0,
    special: Mapping[str, Callable[[list[int]], torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """A state dict with exactly the manifest's keys and shapes: random values (running variances
    near 1, BN step counters 0), or meta tensors; `special` maps a key suffix to the tensor a key
    ending so must hold (e.g. a Swin's relative position index)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in manifest["keys"]:
        fill = next((fn for suffix, fn in (special or {}).items() if key.endswith(suffix)), None)
        if fill is not None:
            state[key] = fill(shape)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long, device=device)
        elif device == "meta":
            state[key] = torch.empty(shape, device="meta")
        elif key.endswith("running_var"):
            state[key] = 1 + 0.1 * torch.rand(shape, generator=gen)
        else:
            state[key] = 0.02 * torch.randn(shape, generator=gen)
    return state


def meta_model(config: ModelConfig) -> nn.Module:
    """The model `config` describes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build_model(config)
