"""MTI-Net release (SimonVandenhende/Multi-Task-Learning-PyTorch, `configs/*/hrnet18/mti_net.yml`)
-> mtvision's `mtinet` decoder.

The release's raw HRNet (`backbone.*`) is timm's HRNet with `feature_location: ''` key for key
(bilinear fuse upsampling, BatchNorm momentum 0.01; see `padnet.py`).  Per scale s: `scale_<s>`
-> `decoder.scales.<s>` (`decoders` -> `predictions`), `fpm_scale_<s>` -> `decoder.propagation.<s-1>`
(`dimensionality_reduction` -> `reduction`), `distillation_scale_<s>` -> `decoder.distillation.<s>`;
`heads.<t>.last_layer` -> `decoder.heads.<t>`.  Tasks get mtvision's names in the release's order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from mtvision.convert.base import Conversion, ConversionError, check_all_used, check_dataset
from mtvision.convert.padnet import (
    RELEASE_SIZE,
    Rule,
    hrnet_backbone,
    infer_hrnet,
    release_tasks,
    rename_all,
    task_names,
    task_pattern,
)
from mtvision.models.config import ModelConfig, PreprocessConfig


def convert_mtinet(state: Mapping[str, Tensor], dataset: str, input_size: tuple[int, int] | None = None,
                   backbone: str | None = None) -> Conversion:
    """An MTI-Net release state dict trained on `dataset` -> Conversion (mtvision `mtinet`)."""
    check_dataset(dataset)
    if not any(k.startswith("fpm_scale_") for k in state):
        raise ConversionError("the checkpoint has no 'fpm_scale_*' tensors: not an MTI-Net checkpoint")
    names = task_names(dataset)
    aux = sorted({k.split(".")[2] for k in state if k.startswith("scale_0.decoders.")})
    if set(aux) != set(names):
        raise ConversionError(f"the checkpoint's scale predictions are for tasks {aux}, not the {dataset} release's "
                              f"{list(names)} (auxiliary-only tasks, as in mti_net+edges_normals, are not supported)")
    tasks = release_tasks(state, dataset, r"heads\.([a-z_]+)\.last_layer\.3\.weight", lambda t: f"heads.{t}.last_layer.3.weight")
    name = infer_hrnet(state, "backbone.", backbone)
    t = task_pattern(names)
    rules: list[Rule] = [
        (r"backbone\.(.+)", lambda m: f"decoder.backbone.body.{m[1]}"),
        (rf"scale_(\d)\.refinement\.{t}\.(.+)", lambda m: f"decoder.scales.{m[1]}.refinement.{names[m[2]]}.{m[3]}"),
        (rf"scale_(\d)\.decoders\.{t}\.(weight|bias)", lambda m: f"decoder.scales.{m[1]}.predictions.{names[m[2]]}.{m[3]}"),
        (r"fpm_scale_(\d)\.non_linear\.(.+)", lambda m: f"decoder.propagation.{int(m[1]) - 1}.non_linear.{m[2]}"),
        (r"fpm_scale_(\d)\.dimensionality_reduction\.(.+)", lambda m: f"decoder.propagation.{int(m[1]) - 1}.reduction.{m[2]}"),
        (rf"fpm_scale_(\d)\.se\.{t}\.(.+)", lambda m: f"decoder.propagation.{int(m[1]) - 1}.se.{names[m[2]]}.{m[3]}"),
        (rf"distillation_scale_(\d)\.self_attention\.{t}\.{t}\.attention\.0\.weight",
         lambda m: f"decoder.distillation.{m[1]}.messages.{names[m[2]]}.{names[m[3]]}.attention.weight"),
        (rf"distillation_scale_(\d)\.self_attention\.{t}\.{t}\.conv\.weight",
         lambda m: f"decoder.distillation.{m[1]}.messages.{names[m[2]]}.{names[m[3]]}.conv.weight"),
        (rf"heads\.{t}\.last_layer\.(.+)", lambda m: f"decoder.heads.{names[m[1]]}.{m[2]}"),
    ]
    out, used = rename_all(state, [(re.compile(p), f) for p, f in rules])
    check_all_used(state, used, {})
    size = tuple(input_size) if input_size is not None else RELEASE_SIZE[dataset]
    config = ModelConfig(
        backbone=hrnet_backbone(name),
        decoder="mtinet",
        tasks=tasks,
        preprocess=PreprocessConfig(mode="stretch", input_size=list(size), size_divisor=32),
    )
    return Conversion(config=config, state_dict=out, skipped={})
