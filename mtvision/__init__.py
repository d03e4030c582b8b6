"""mtvision: multi-task dense prediction for computer vision."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public API, imported on first use so that `import mtvision` stays light (no torch/timm import).
_LAZY = {
    "create_model": "mtvision.models.registry",
    "load": "mtvision.inference",
    "Predictor": "mtvision.inference",
}

__all__ = ["Predictor", "__version__", "catalog", "create_model", "list_models", "load"]

LIST_KINDS = ("decoders", "backbones", "configs", "released")
"""What `list_models` and `catalog` list (see `list_models`)."""


def catalog(pattern: str | None = None, kinds: tuple[str, ...] = LIST_KINDS) -> dict[str, dict[str, str]]:
    """Kind -> name -> one-line description, for the names matching `pattern` (shell-style wildcards,
    case-insensitive; without wildcards, a substring); kinds as in `list_models`."""
    from mtvision.models import catalog as models_catalog

    unknown = [k for k in kinds if k not in LIST_KINDS]
    if unknown:
        raise ValueError(f"unknown kind {unknown[0]!r} (valid: {', '.join(LIST_KINDS)}, all)")
    out: dict[str, dict[str, str]] = {}
    for kind in kinds:
        if kind == "decoders":
            out[kind] = models_catalog.decoders(pattern)
        elif kind == "backbones":
            out[kind] = models_catalog.backbone_families(pattern)
        elif kind == "configs":
            out[kind] = models_catalog.shipped_configs(pattern)
        else:
            from mtvision.convert import FORMATS

            out[kind] = {
                name: (getattr(fn, "__doc__", None) or "").strip().split("\n")[0]
                for name, fn in sorted(FORMATS.items())
                if models_catalog.matches(name, pattern)
            }
    return out


def list_models(pattern: str | None = None, kind: str = "decoders") -> list[str]:
    """Names matching `pattern` (shell-style wildcards such as "*mamba*", case-insensitive; without
    wildcards, a substring) of one kind:

    - "decoders": the model families (a config's `model.decoder`), the default;
    - "backbones": the timm backbone families the adapter supports;
    - "configs": the experiment configs shipped in configs/ (a source checkout);
    - "released": the released checkpoint formats `mtv-convert` turns into pretrained folders
      (`mtvision.convert.FORMATS`);
    - "all": every kind, as "kind:name".
    """
    if kind == "all":
        return [f"{k}:{name}" for k, names in catalog(pattern).items() for name in names]
    return sorted(catalog(pattern, (kind,))[kind])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtvision' has no attribute {name!r}")
