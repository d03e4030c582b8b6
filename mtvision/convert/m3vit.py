"""M3ViT release (VITA-Group/M3ViT, `pup_moe_vit_small_multi_task_baseline.yml` trained with the
README's command) -> mtvision's `m3vit` decoder.

The backbone (`backbone.*`, VisionTransformerMoE) becomes timm's ViT with 12 heads
(`deit_small_patch16_224`, `num_heads: 12`) whose MoE blocks (`blocks.<odd>.mlp`) map onto
`moe`: `gate.<task id>.w_gate` -> `gate_weight.<task>`, `experts.htoh4` -> `w1`/`b1`,
`experts.h4toh` -> `w2`/`b2` (same E x out x in layout).  The release saves one file per rank
(rank 0 with experts 0-7 and everything else, rank 1 with experts 8-15 only): merge them first
(concatenate the `mlp.experts.*` tensors along dim 0).  Heads `decoders.<t>` -> `heads.<t>`
(`conv_i`/`syncbn_fc_i` -> `convs.i`/`norms.i`, `conv_4` -> `out`), the training-time TAMs
`tam_model<l>` -> `tam.<l>`.  The position embedding fixes the input grid: `input_size` must be the
size it was trained at (default: the release's, 480x640 NYUD / 512x512 PASCAL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from mtvision.convert.base import RELEASE_TASK_NAMES, Conversion, ConversionError, check_all_used, check_dataset, take
from mtvision.convert.padnet import Rule, rename_all, task_pattern
from mtvision.models.config import BackboneConfig, ModelConfig, PreprocessConfig

RELEASE_TASKS = {
    "nyud": ("semseg", "depth"),
    "pascal": ("semseg", "human_parts", "sal", "normals", "edge"),
}
"""The release configs' tasks in their order (the task ids of the gates)."""

RELEASE_SIZE = {"nyud": (480, 640), "pascal": (512, 512)}
"""The release's training size (`img_size` of the backbone and heads)."""

VITS = {(384, 12, 16): "deit_small_patch16_224"}
"""(width, depth, patch) of the release's ViT-MoE -> timm architecture (with `num_heads: 12`)."""

RELEASE_HEADS = 12
"""Attention heads of the release's ViT-S (head width 32; DeiT-S has 6)."""

_TAM = {"layers0": "mix", "layers1": "balance", "layers2": "fuse", "encoder0": "down.0", "encoder1": "down.1",
        "decoder0": "up.0", "decoder1": "up.1"}


def convert_m3vit(state: Mapping[str, Tensor], dataset: str, input_size: tuple[int, int] | None = None,
                  backbone: str | None = None) -> Conversion:
    """An M3ViT release state dict trained on `dataset` -> Conversion (mtvision `m3vit`)."""
    check_dataset(dataset)
    if not any(".mlp.gate." in k for k in state):
        raise ConversionError("the checkpoint has no 'backbone.blocks.*.mlp.gate.*' tensors: not an M3ViT (multi-gate) checkpoint")
    names = {t: RELEASE_TASK_NAMES.get(t, t) for t in RELEASE_TASKS[dataset]}
    ids = dict(enumerate(names.values()))
    heads = sorted({k.split(".")[1] for k in state if k.startswith("decoders.")})
    gates = sorted({int(m[1]) for k in state if (m := re.fullmatch(r"backbone\.blocks\.\d+\.mlp\.gate\.(\d+)\.w_gate", k))})
    if set(heads) != set(names) or gates != list(ids):
        raise ConversionError(f"the checkpoint has heads {heads} and {len(gates)} gates per MoE layer, not the {dataset} "
                              f"release's {list(names)}: another dataset?")
    width = int(take(state, set(), "backbone.cls_token").shape[-1])
    depth = 1 + max(int(m[1]) for k in state if (m := re.fullmatch(r"backbone\.blocks\.(\d+)\..+", k)))
    patch = int(take(state, set(), "backbone.patch_embed.proj.weight").shape[-1])
    name = backbone or VITS.get((width, depth, patch))
    if name is None:
        raise ConversionError(f"no known ViT has width {width}, depth {depth} and patch {patch} (known: {sorted(VITS)})")
    experts = {int(v.shape[0]) for k, v in state.items() if k.endswith("mlp.experts.htoh4.weight")}
    total = {int(v.shape[1]) for k, v in state.items() if k.endswith(".w_gate")}
    if len(experts) != 1 or len(total) != 1:
        raise ConversionError(f"the MoE layers disagree on their expert counts ({sorted(experts)} experts, gates over {sorted(total)})")
    (num_experts,), (gate_experts,) = experts, total
    if num_experts != gate_experts:
        raise ConversionError(
            f"the checkpoint holds {num_experts} of the {gate_experts} experts its gates route to: the release saves one "
            "file per rank; merge them first (concatenate every 'mlp.experts.*' tensor of the rank files along dim 0, "
            "rank 0 first)"
        )
    size = tuple(input_size) if input_size is not None else RELEASE_SIZE[dataset]
    grid = (size[0] // patch) * (size[1] // patch)
    tokens = int(take(state, set(), "backbone.pos_embed").shape[1])
    if size[0] % patch or size[1] % patch or tokens != grid + 1:
        raise ConversionError(f"the position embedding has {tokens} tokens, which does not fit {size[0]}x{size[1]} inputs "
                              f"({grid} patches + the class token): give the size it was trained at (--input-size H W)")
    hidden = int(take(state, set(), next(k for k in state if k.endswith("mlp.experts.htoh4.weight"))).shape[1])
    top_k = 4  # the released command's --moe_top_k (not stored in the weights)
    t = task_pattern(names)
    rules: list[Rule] = [
        (r"backbone\.(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias))", lambda m: f"decoder.backbone.vit.{m[1]}"),
        (r"backbone\.blocks\.(\d+)\.((?:norm1|attn|norm2|mlp\.fc1|mlp\.fc2)\..+)", lambda m: f"decoder.backbone.vit.blocks.{m[1]}.{m[2]}"),
        (r"backbone\.blocks\.(\d+)\.mlp\.gate\.(\d+)\.w_gate", lambda m: f"decoder.backbone.vit.blocks.{m[1]}.moe.gate_weight.{ids[int(m[2])]}"),
        (r"backbone\.blocks\.(\d+)\.mlp\.experts\.(htoh4|h4toh)\.(weight|bias)",
         lambda m: f"decoder.backbone.vit.blocks.{m[1]}.moe.{dict(weight='w', bias='b')[m[3]]}{1 if m[2] == 'htoh4' else 2}"),
        (rf"decoders\.{t}\.norm\.(weight|bias)", lambda m: f"decoder.heads.{names[m[1]]}.norm.{m[2]}"),
        (rf"decoders\.{t}\.conv_([0-3])\.(.+)", lambda m: f"decoder.heads.{names[m[1]]}.convs.{m[2]}.{m[3]}"),
        (rf"decoders\.{t}\.syncbn_fc_([0-3])\.(.+)", lambda m: f"decoder.heads.{names[m[1]]}.norms.{m[2]}.{m[3]}"),
        (rf"decoders\.{t}\.conv_4\.(weight|bias)", lambda m: f"decoder.heads.{names[m[1]]}.out.{m[2]}"),
        (r"tam_model([0-2])\.(layers[012]|encoder[01]|decoder[01])\.(.+)", lambda m: f"decoder.tam.{m[1]}.{_TAM[m[2]]}.{m[3]}"),
        (rf"tam_model([0-2])\.layers3\.{t}\.(.+)", lambda m: f"decoder.tam.{m[1]}.refine.{names[m[2]]}.{m[3]}"),
        (rf"tam_model([0-2])\.layers4\.{t}\.0\.(weight|bias)", lambda m: f"decoder.tam.{m[1]}.predict.{names[m[2]]}.{m[3]}"),
    ]
    out, used = rename_all(state, [(re.compile(p), f) for p, f in rules])
    check_all_used(state, used, {})
    levels = sorted({int(k[len("tam_model")]) for k in state if k.startswith("tam_model")})
    heads_width = int(take(state, set(), f"decoders.{next(iter(names))}.conv_0.weight").shape[0])
    config = ModelConfig(
        backbone=BackboneConfig(name=name, out_indices=[depth - 1],
                                kwargs={"num_heads": RELEASE_HEADS, "img_size": list(size), "dynamic_img_size": True}),
        decoder="m3vit",
        decoder_options={"num_experts": num_experts, "top_k": top_k, "expert_mlp_ratio": hidden / width,
                         "head_channels": heads_width, "tam_levels": levels},
        tasks={names[r]: int(take(state, set(), f"decoders.{r}.conv_4.weight").shape[0]) if names[r] in ("semseg", "parts") else None
               for r in names},
        preprocess=PreprocessConfig(mode="stretch", input_size=list(size), size_divisor=patch),
    )
    return Conversion(config=config, state_dict=out, skipped={})
