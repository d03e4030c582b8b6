"""MTMamba and MTMamba++ releases (EnVision-Research/MTMamba, `mtmamba_*.pth.tar` and
`mtmamba_plus_*.pth.tar`) -> mtvision's `mtmamba` decoder (variants "mtmamba" and "mtmamba++").

The releases run mmseg's Swin Transformer (Swin-L, window 12), which becomes timm's Swin with
`swin_impl: mmseg` and `output_norm: all` (mmseg's `norm0..3`, eps 1e-5).  Backbone keys are
renamed to timm's, PatchMerging tensors are reordered (`mmseg_merging_to_timm`) and the persistent
`relative_position_index` buffers are checked against timm's and skipped (timm recomputes them).
The decoder keys are renamed one to one; the MTMamba++ 1x1 convolutions (ECR, the S-CTM's shared
projection) become linear maps.  The tasks keep the release's order (the order of every
concatenation over tasks) with mtvision's names; the saliency head keeps its two outputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mtvision.convert.base import RELEASE_TASK_NAMES, Conversion, ConversionError, check_all_used, check_dataset, take
from mtvision.models.config import BackboneConfig, ModelConfig, PreprocessConfig
from mtvision.models.swin_mmseg import mmseg_merging_to_timm

RELEASE_TASKS = {
    "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1},
    "pascal": {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1},
}
"""The releases' tasks (`p.TASKS.NAMES` order, the order of their concatenations) and outputs."""

RELEASE_SIZE = {"nyud": (448, 576), "pascal": (512, 512)}
"""The releases' training and test size (IMAGE_ORI_SIZE)."""

SWINS = {
    (96, (2, 2, 6, 2), 7): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), 7): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), 7): "swin_base_patch4_window7_224",
    (128, (2, 2, 18, 2), 12): "swin_base_patch4_window12_384",
    (192, (2, 2, 18, 2), 7): "swin_large_patch4_window7_224",
    (192, (2, 2, 18, 2), 12): "swin_large_patch4_window12_384",
}
"""(embedding width, blocks per stage, window) of mmseg Swins -> timm's architecture."""

VARIANT_OF_FORMAT = {"mtmamba": "mtmamba", "mtmamba_plus": "mtmamba++"}
_MARKER = {"mtmamba": "block_1.", "mtmamba_plus": "block_stm."}  # a key prefix only that format has

_SCAN = {"x_proj_weight": "scan.x_proj_weight", "dt_projs_weight": "scan.dt_proj_weight",
         "dt_projs_bias": "scan.dt_proj_bias", "A_logs": "scan.A_log", "Ds": "scan.D"}


def _ss2d_key(rest: str) -> str:
    """An SS2D / CSS2D parameter name of the release -> mtvision's (`ss2d.py`)."""
    if rest in _SCAN:
        return _SCAN[rest]
    if rest.startswith("conv2d."):
        return "conv." + rest[len("conv2d."):]
    if rest == "in_proj_cross.weight":
        return "cross_proj.weight"
    if rest.split(".")[0] in ("in_proj", "out_norm", "out_proj"):
        return rest
    raise KeyError(rest)


def _as_linear(w: Tensor) -> Tensor:
    """A 1x1 convolution weight (out, in, 1, 1) as a linear weight (out, in)."""
    return w.flatten(1) if w.dim() == 4 else w


Rule = Callable[[re.Match], "tuple[str, Callable[[Tensor], Tensor] | None]"]


def _decoder_rules(variant: str, names: Mapping[str, str]) -> list[tuple[str, Rule]]:
    """(regex over release keys, match -> (mtvision key, transform or None))."""
    task = "(" + "|".join(re.escape(t) for t in names) + ")"

    def stm(m: re.Match, block: str):
        return f"decoder.stm.{names[m[1]]}.{m[2]}.{block}.{_stm_key(m[3])}", None

    rules: list[tuple[str, Rule]] = [
        (rf"expand_layers\.{task}_(\d+)\.(.+)", lambda m: (f"decoder.expand.{names[m[1]]}.{m[2]}.{m[3]}", None)),
        (rf"concat_layers\.{task}_(\d+)\.(weight|bias)", lambda m: (f"decoder.reduce.{names[m[1]]}.{m[2]}.{m[3]}", _as_linear)),
        (rf"final_project\.{task}\.(weight|bias)", lambda m: (f"decoder.heads.{names[m[1]]}.out.{m[2]}", None)),
    ]
    if variant == "mtmamba":
        rules += [
            (rf"block_1\.{task}_(\d+)\.(.+)", lambda m: stm(m, "0")),
            (rf"block_2\.{task}_(\d+)\.(.+)", lambda m: stm(m, "1")),
            (rf"final_expand\.{task}\.(.+)", lambda m: (f"decoder.heads.{names[m[1]]}.expand.{m[2]}", None)),
            (r"block_3\.(\d+)\.norm_share\.(.+)", lambda m: (f"decoder.cross.{m[1]}.shared_norm.{m[2]}", None)),
            (r"block_3\.(\d+)\.op_share\.(.+)", lambda m: (f"decoder.cross.{m[1]}.shared.{_ss2d_key(m[2])}", None)),
            (rf"block_3\.(\d+)\.norm\.{task}\.(.+)", lambda m: (f"decoder.cross.{m[1]}.norm.{names[m[2]]}.{m[3]}", None)),
            (rf"block_3\.(\d+)\.op\.{task}\.(.+)", lambda m: (f"decoder.cross.{m[1]}.op.{names[m[2]]}.{_ss2d_key(m[3])}", None)),
            (rf"block_3\.(\d+)\.in_proj\.{task}\.weight", lambda m: (f"decoder.cross.{m[1]}.gate.{names[m[2]]}.weight", None)),
            (rf"block_3\.(\d+)\.out_proj\.{task}\.weight", lambda m: (f"decoder.cross.{m[1]}.out_proj.{names[m[2]]}.weight", None)),
        ]
    else:
        rules += [
            (rf"block_stm\.{task}_(\d+)\.(\d+)\.(.+)",
             lambda m: (f"decoder.stm.{names[m[1]]}.{m[2]}.{m[3]}.{_stm_key(m[4])}", None)),
            (rf"final_expand\.{task}\.([01])\.(.+)", lambda m: (f"decoder.heads.{names[m[1]]}.body.{m[2]}.{m[3]}", None)),
            (r"block_ctm\.(\d+)\.0\.norm_share\.(.+)", lambda m: (f"decoder.cross.{m[1]}.shared_norm.{m[2]}", None)),
            (r"block_ctm\.(\d+)\.0\.conv_share\.0\.(weight|bias)", lambda m: (f"decoder.cross.{m[1]}.share_proj.{m[2]}", _as_linear)),
            (r"block_ctm\.(\d+)\.0\.conv_share\.1\.(weight|bias)", lambda m: (f"decoder.cross.{m[1]}.share_conv.{m[2]}", None)),
            (rf"block_ctm\.(\d+)\.0\.norm\.{task}\.(.+)", lambda m: (f"decoder.cross.{m[1]}.norm.{names[m[2]]}.{m[3]}", None)),
            (rf"block_ctm\.(\d+)\.0\.op\.{task}\.(.+)", lambda m: (f"decoder.cross.{m[1]}.op.{names[m[2]]}.{_ss2d_key(m[3])}", None)),
        ]
    return rules


def _stm_key(rest: str) -> str:
    """An STM block parameter of the release (`norm.*`, `op.*`) -> mtvision's."""
    if rest.startswith("op."):
        return "op." + _ss2d_key(rest[len("op."):])
    if rest.startswith("norm."):
        return rest
    raise KeyError(rest)


def _backbone_rules() -> list[tuple[str, Rule]]:
    body = "decoder.backbone.body"
    ffn = {"ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"}
    return [
        (r"backbone\.patch_embed\.projection\.(.+)", lambda m: (f"{body}.patch_embed.proj.{m[1]}", None)),
        (r"backbone\.patch_embed\.norm\.(.+)", lambda m: (f"{body}.patch_embed.norm.{m[1]}", None)),
        (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.(norm1|norm2)\.(.+)",
         lambda m: (f"{body}.layers_{m[1]}.blocks.{m[2]}.{m[3]}.{m[4]}", None)),
        (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(relative_position_bias_table|qkv\.weight|qkv\.bias|proj\.weight|proj\.bias)",
         lambda m: (f"{body}.layers_{m[1]}.blocks.{m[2]}.attn.{m[3]}", None)),
        (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.(ffn\.layers\.0\.0|ffn\.layers\.1)\.(weight|bias)",
         lambda m: (f"{body}.layers_{m[1]}.blocks.{m[2]}.{ffn[m[3]]}.{m[4]}", None)),
        (r"backbone\.stages\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)",
         lambda m: (f"{body}.layers_{int(m[1]) + 1}.downsample.{m[2]}", mmseg_merging_to_timm)),
        (r"backbone\.norm([0-3])\.(weight|bias)", lambda m: (f"decoder.backbone.output_norms.{m[1]}.{m[2]}", None)),
    ]


def _relative_position_index(window: int) -> Tensor:
    """The Swin relative position index of a window x window window (mmseg's = timm's)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def infer_swin(state: Mapping[str, Tensor]) -> tuple[str, int]:
    """The timm name and window of the mmseg Swin in a release state dict (ConversionError if none fits)."""
    key = "backbone.patch_embed.projection.weight"
    if key not in state:
        raise ConversionError(f"the checkpoint has no {key!r}: not an MTMamba release (mmseg Swin backbone)?")
    embed = int(state[key].shape[0])
    stage_blocks = re.compile(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight")
    counts: dict[int, int] = {}
    for k in state:
        m = stage_blocks.fullmatch(k)
        if m:
            counts[int(m[1])] = max(counts.get(int(m[1]), 0), int(m[2]) + 1)
    depths = tuple(counts[i] for i in sorted(counts))
    table = state.get("backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table")
    side = round(float(table.shape[0]) ** 0.5) if table is not None else 0
    window = (side + 1) // 2
    heads = tuple(int(state[f"backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"].shape[1]) for i in sorted(counts))
    name = SWINS.get((embed, depths, window))
    if name is None or side * side != table.shape[0] or heads != tuple(embed // 32 * 2**i for i in range(4)):
        raise ConversionError(
            f"no known Swin has embedding width {embed}, blocks {depths}, window {window} and heads {heads} "
            f"(known: {', '.join(SWINS.values())})"
        )
    return name, window


def _check_format(state: Mapping[str, Tensor], format: str) -> None:
    other = next(f for f in _MARKER if f != format)
    if any(k.startswith(_MARKER[other]) for k in state):
        raise ConversionError(f"this is a checkpoint of format {other!r} ({VARIANT_OF_FORMAT[other]}), not {format!r}")
    if not any(k.startswith(_MARKER[format]) for k in state):
        raise ConversionError(f"the checkpoint has no {_MARKER[format]}* keys: not a {format!r} release")


def _check_tasks(state: Mapping[str, Tensor], dataset: str) -> None:
    found = {k.split(".")[1]: int(v.shape[0]) for k, v in state.items() if re.fullmatch(r"final_project\.[^.]+\.weight", k)}
    expected = RELEASE_TASKS[dataset]
    if found != expected:
        raise ConversionError(f"the checkpoint's heads {found} are not the {dataset} release's {expected}: another dataset?")


def convert_release(format: str, state: Mapping[str, Tensor], dataset: str,
                    input_size: tuple[int, int] | None, backbone: str | None) -> Conversion:
    """A release state dict of `format` ("mtmamba" | "mtmamba_plus") trained on `dataset` -> Conversion."""
    check_dataset(dataset)
    _check_format(state, format)
    inferred, window = infer_swin(state)
    _check_tasks(state, dataset)
    name = backbone or inferred
    size = tuple(input_size) if input_size is not None else RELEASE_SIZE[dataset]
    names = {t: RELEASE_TASK_NAMES.get(t, t) for t in RELEASE_TASKS[dataset]}
    config = ModelConfig(
        backbone=BackboneConfig(name=name, drop_path_rate=0.1, output_norm="all", output_norm_eps=1e-5,
                                swin_impl="mmseg", kwargs={"img_size": list(size)}),
        decoder="mtmamba",
        decoder_options={"variant": VARIANT_OF_FORMAT[format]},
        tasks={names[t]: (n if names[t] in ("semseg", "parts") else None) for t, n in RELEASE_TASKS[dataset].items()},
        preprocess=PreprocessConfig(mode="pad", input_size=list(size), size_divisor=32),
    )
    rules = [(re.compile(p), f) for p, f in _backbone_rules() + _decoder_rules(VARIANT_OF_FORMAT[format], names)]
    used: set[str] = set()
    skipped: dict[str, str] = {}
    out: dict[str, Tensor] = {}
    index = _relative_position_index(window)
    for key in state:
        if key.endswith("attn.w_msa.relative_position_index"):
            if not torch.equal(state[key].long(), index):
                raise ConversionError(f"{key} is not the standard Swin index of window {window}")
            skipped[key] = "timm recomputes the relative position index (checked equal)"
            continue
        for pattern, rule in rules:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            try:
                target, transform = rule(m)
            except KeyError:
                break  # an unknown sub-key: reported as unmapped below
            value = take(state, used, key)
            out[target] = transform(value) if transform is not None else value
            break
    check_all_used(state, used, skipped)
    return Conversion(config=config, state_dict=out, skipped=skipped)


def convert_mtmamba(state: Mapping[str, Tensor], dataset: str, input_size: tuple[int, int] | None = None,
                    backbone: str | None = None) -> Conversion:
    """MTMamba (ECCV 2024) release -> mtvision `mtmamba` with variant "mtmamba"."""
    return convert_release("mtmamba", state, dataset, input_size, backbone)


def convert_mtmamba_plus(state: Mapping[str, Tensor], dataset: str, input_size: tuple[int, int] | None = None,
                         backbone: str | None = None) -> Conversion:
    """MTMamba++ release -> mtvision `mtmamba` with variant "mtmamba++"."""
    return convert_release("mtmamba_plus", state, dataset, input_size, backbone)
