"""PAD-Net release (SimonVandenhende/Multi-Task-Learning-PyTorch, `configs/*/hrnet18/pad_net.yml`,
`best_model.pth.tar` / `checkpoint.pth.tar`) -> mtvision's `padnet` decoder.

The release's HRNet (`backbone.0.*`) is timm's HRNet with `feature_location: ''`, key for key; its
fuse layers upsample bilinearly (`backbone.upsample_mode: bilinear`) and its BatchNorm momentum is
0.01.  The HRNet variant is found from the tensor shapes.  The fuse (`backbone.1.last_layer`), the
initial predictions, the distillation blocks and the heads are renamed one to one; tasks get
mtvision's names and keep the release's order (semseg, human_parts, sal, normals, edge, depth).
Shared with `mtinet.py`: the task lists, the HRNet inference and the renaming loop.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence

import timm
import torch
from torch import Tensor

from mtvision.convert.base import RELEASE_TASK_NAMES, Conversion, ConversionError, check_all_used, check_dataset, take
from mtvision.models.config import BackboneConfig, ModelConfig, PreprocessConfig

RELEASE_TASKS = {
    "nyud": ("semseg", "depth"),
    "pascal": ("semseg", "human_parts", "sal", "normals", "edge"),
}
"""The release configs' tasks (`configs/<dataset>/hrnet18/*.yml`), in the order the release builds them."""

RELEASE_SIZE = {"nyud": (480, 640), "pascal": (512, 512)}
"""The release's FixedResize size for training and testing."""

HRNETS = {"hrnet_w18_small_v2": 18, "hrnet_w18_small": 16, "hrnet_w18": 18, "hrnet_w30": 30, "hrnet_w32": 32,
          "hrnet_w40": 40, "hrnet_w44": 44, "hrnet_w48": 48, "hrnet_w64": 64}
"""timm HRNets a release backbone is matched against (the releases use hrnet_w18_small_v2), with
the width of their first branch."""

HRNET_BN_MOMENTUM = 0.01
"""The release HRNet's BatchNorm momentum (`models/seg_hrnet.py`)."""

Rule = tuple["re.Pattern[str]", Callable[[re.Match], str]]


def task_names(dataset: str) -> dict[str, str]:
    """Release task name -> mtvision's, for the tasks of `dataset`'s release configs."""
    return {t: RELEASE_TASK_NAMES.get(t, t) for t in RELEASE_TASKS[check_dataset(dataset)]}


@functools.cache
def hrnet_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of timm HRNet `name` as a features-only model (built on the meta
    device, once per name)."""
    with torch.device("meta"):
        model = timm.create_model(name, features_only=True, feature_location="", pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_hrnet(state: Mapping[str, Tensor], prefix: str, backbone: str | None = None) -> str:
    """The timm HRNet whose keys and shapes are exactly the release's tensors under `prefix`
    (`backbone`: check that one instead of searching)."""
    release = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    if not release:
        raise ConversionError(f"the checkpoint has no backbone tensors under {prefix!r}: is it a checkpoint of this model?")
    width = release.get("transition1.0.0.weight", ("?",))[0]
    for name in [backbone] if backbone else [n for n, w in HRNETS.items() if w == width]:
        expected = hrnet_shapes(name)
        if expected == release:
            return name
        if backbone:
            wrong = [k for k in expected if release.get(k) != expected[k]] + [k for k in release if k not in expected]
            raise ConversionError(f"the checkpoint's backbone does not fit timm {backbone!r}: e.g. {wrong[:4]}")
    raise ConversionError(
        f"the checkpoint's backbone (first branch width {width}, {len(release)} tensors) fits no timm HRNet of {list(HRNETS)}"
    )


def hrnet_backbone(name: str) -> BackboneConfig:
    """The backbone config of a release HRNet: timm's raw branches, bilinear fuse, BN momentum 0.01."""
    return BackboneConfig(name=name, kwargs={"feature_location": ""}, upsample_mode="bilinear", bn_momentum=HRNET_BN_MOMENTUM)


def release_tasks(state: Mapping[str, Tensor], dataset: str, head_key: str, outputs_of: Callable[[str], str]) -> dict[str, int | None]:
    """mtvision's task spec of the checkpoint (class counts from the heads), checked against the
    tasks of `dataset`'s release: `head_key` matches one key per task (group 1: the task),
    `outputs_of(task)` is the key whose first dimension is the task's output count."""
    pattern = re.compile(head_key)
    found = sorted({m[1] for k in state if (m := pattern.fullmatch(k))})
    names = task_names(dataset)
    if set(found) != set(names):
        raise ConversionError(f"the checkpoint's heads are for tasks {found}, not the {dataset} release's {list(names)}: another dataset?")
    spec: dict[str, int | None] = {}
    for release, mine in names.items():
        n = int(take(state, set(), outputs_of(release)).shape[0])
        spec[mine] = n if mine in ("semseg", "parts") else None
    return spec


def rename_all(state: Mapping[str, Tensor], rules: Sequence[Rule]) -> tuple[dict[str, Tensor], set[str]]:
    """Every release key matched by a rule (first match wins) under its mtvision name."""
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for key in state:
        for pattern, target in rules:
            m = pattern.fullmatch(key)
            if m is not None:
                out[target(m)] = take(state, used, key)
                break
    return out, used


def task_pattern(names: Mapping[str, str]) -> str:
    """A regex group alternating the release task names."""
    return "(" + "|".join(re.escape(t) for t in names) + ")"


def convert_padnet(state: Mapping[str, Tensor], dataset: str, input_size: tuple[int, int] | None = None,
                   backbone: str | None = None) -> Conversion:
    """A PAD-Net release state dict trained on `dataset` -> Conversion (mtvision `padnet`)."""
    check_dataset(dataset)
    if not any(k.startswith("multi_modal_distillation.") for k in state):
        raise ConversionError("the checkpoint has no 'multi_modal_distillation.*' tensors: not a PAD-Net checkpoint")
    names = task_names(dataset)
    aux = sorted({k.split(".")[2] for k in state if k.startswith("initial_task_prediction_heads.conv_out.")})
    if set(aux) != set(names):
        raise ConversionError(f"the checkpoint's initial predictions are for tasks {aux}, not the {dataset} release's "
                              f"{list(names)} (auxiliary-only tasks, as in pad_net+edges_normals, are not supported)")
    tasks = release_tasks(state, dataset, r"heads\.([a-z_]+)\.2\.weight", lambda t: f"heads.{t}.2.weight")
    name = infer_hrnet(state, "backbone.0.", backbone)
    heads = int(take(state, set(), f"heads.{next(iter(names))}.2.weight").shape[1])
    fuse = take(state, set(), "backbone.1.last_layer.0.weight")
    t = task_pattern(names)
    rules: list[Rule] = [
        (r"backbone\.0\.(.+)", lambda m: f"decoder.backbone.body.{m[1]}"),
        (r"backbone\.1\.last_layer\.([01])\.(.+)", lambda m: f"decoder.fuse.proj.{m[1]}.{m[2]}"),
        (rf"initial_task_prediction_heads\.layers\.{t}\.(.+)", lambda m: f"decoder.initial.{names[m[1]]}.{m[2]}"),
        (rf"initial_task_prediction_heads\.conv_out\.{t}\.(weight|bias)", lambda m: f"decoder.initial_heads.{names[m[1]]}.{m[2]}"),
        (rf"multi_modal_distillation\.self_attention\.{t}\.{t}\.attention\.0\.weight",
         lambda m: f"decoder.distillation.messages.{names[m[1]]}.{names[m[2]]}.attention.weight"),
        (rf"multi_modal_distillation\.self_attention\.{t}\.{t}\.conv\.weight",
         lambda m: f"decoder.distillation.messages.{names[m[1]]}.{names[m[2]]}.conv.weight"),
        (rf"heads\.{t}\.(.+)", lambda m: f"decoder.heads.{names[m[1]]}.{m[2]}"),
    ]
    out, used = rename_all(state, [(re.compile(p), f) for p, f in rules])
    check_all_used(state, used, {})
    size = tuple(input_size) if input_size is not None else RELEASE_SIZE[dataset]
    config = ModelConfig(
        backbone=hrnet_backbone(name),
        decoder="padnet",
        decoder_options={"head_channels": heads, "neck_channels": None if fuse.shape[0] == fuse.shape[1] else int(fuse.shape[0])},
        tasks=tasks,
        preprocess=PreprocessConfig(mode="stretch", input_size=list(size), size_divisor=32),
    )
    return Conversion(config=config, state_dict=out, skipped={})

