"""What can be built: the decoders, the backbone families the adapter supports, and the shipped configs,
each with a one-line description, filtered by a shell-style pattern (`fnmatch`, case-insensitive; a
pattern without wildcards matches as a substring).  `mtvision.list_models` and `mtv-list` read it.
"""

from __future__ import annotations

import fnmatch
import inspect
from pathlib import Path

from mtvision.models.registry import DECODERS

BACKBONE_FAMILIES: dict[str, tuple[str, str]] = {
    "resnet": ("resnet*, resnext*, seresnet*, resnetv2*", "CNN, strides 4-32 (e.g. resnet18, resnet50.tv_in1k)"),
    "convnext": ("convnext*", "CNN, strides 4-32 (e.g. convnext_tiny)"),
    "efficientnet": ("efficientnet*, tf_efficientnet*", "CNN, strides 2-32 (e.g. efficientnet_b0)"),
    "mobilenet": ("mobilenetv2*, mobilenetv3*, mobilenetv4*", "CNN, strides 2-32 (e.g. mobilenetv3_large_100)"),
    "hrnet": ("hrnet*", "HRNet, 4 parallel resolutions (e.g. hrnet_w18; PAD-Net, MTI-Net)"),
    "vit": ("vit_*, deit*", "plain ViT, one stride; dynamic_img_size (e.g. vit_large_patch16_384.augreg_in21k_ft_in1k)"),
    "swin": ("swin_*", "Swin Transformer, strides 4-32; swin_impl: mmseg for MTMamba (e.g. swin_large_patch4_window12_384)"),
}
"""Family -> (timm name patterns, what the adapter gives).  Any timm model with `features_only` may work;
these are the families the tests build."""


def matches(name: str, pattern: str | None) -> bool:
    """Whether `name` matches `pattern` (None: everything)."""
    if not pattern:
        return True
    name, pattern = name.lower(), pattern.lower()
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def decoders(pattern: str | None = None) -> dict[str, str]:
    """Decoder name -> the first paragraph of its builder's docstring."""
    return {name: _summary(DECODERS[name]) for name in sorted(DECODERS) if matches(name, pattern)}


def backbone_families(pattern: str | None = None) -> dict[str, str]:
    """Family -> "timm patterns: what it gives", for families whose name or patterns match."""
    out = {}
    for family, (names, note) in BACKBONE_FAMILIES.items():
        if matches(family, pattern) or any(matches(n.strip(), pattern) for n in names.split(",")):
            out[family] = f"{names}: {note}"
    return out


def configs_folder() -> Path | None:
    """The `configs/` folder of a source checkout (None for an installed package without it)."""
    folder = Path(__file__).resolve().parents[2] / "configs"
    return folder if folder.is_dir() else None


def shipped_configs(pattern: str | None = None) -> dict[str, str]:
    """Experiment config path (relative to configs/, e.g. "nyud/hps_vitl16_448x576.yaml") -> its first comment line."""
    folder = configs_folder()
    if folder is None:
        return {}
    out = {}
    for path in sorted(folder.rglob("*.yaml")):
        if "specs" in path.parts:
            continue
        name = path.relative_to(folder).as_posix()
        if not matches(name, pattern):
            continue
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "")
        out[name] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return out
