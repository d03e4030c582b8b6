"""mtvision: multi-task dense prediction for computer vision."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public API, imported on first use so that `import mtvision` stays light (no torch/timm import).
_LAZY = {
    "create_model": "mtvision.models.registry",
    "list_models": "mtvision.models.registry",
    "load": "mtvision.inference",
    "Predictor": "mtvision.inference",
}

__all__ = ["Predictor", "__version__", "create_model", "list_models", "load"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtvision' has no attribute {name!r}")
