"""Released InvPT checkpoints (prismformore/Multi-Task-Transformer, `InvPT/`) -> mtvision's `invpt`
decoder (mtvision/models/decoders/invpt.py).

The release: `backbone.*` a ViT/16 (ViT-L for the released NYUD and PASCAL models) tapped after
blocks depth/4, depth/2 and 3 depth/4, with its final LayerNorm on the last block's tokens;
`multi_task_decoder.*` the decoder, whose per-task lists follow the release's task order;
`heads.<task>.linear_pred` the 1x1 heads.  The backbone size is read from the shapes, the input
size must fit `pos_embed` (see mtvision/convert/release_vit.py).  Parameters the release builds
but never uses are skipped by name.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mtvision.convert.base import Conversion, ConversionError, check_all_used, check_dataset
from mtvision.convert.release_vit import KeyMap, infer_vit, mtvision_task, release_tasks, release_vit_config

DEC = "multi_task_decoder."
UNUSED = "built by the release but never used in its forward"


def convert_invpt(
    state: Mapping[str, Tensor], dataset: str, input_size: tuple[int, int] | None = None, backbone: str | None = None
) -> Conversion:
    """An InvPT release state dict of `dataset` -> the mtvision `invpt` model (config + state dict)."""
    check_dataset(dataset)
    if not any(k.startswith(f"{DEC}invpt.") for k in state):
        raise ConversionError(f"no {DEC}invpt.* keys: not an InvPT checkpoint (TaskPrompter's is format 'taskprompter')")
    names = release_tasks(state, dataset, "heads.{t}.linear_pred.weight")
    vit = infer_vit(state, "backbone.", dataset, input_size, backbone)
    km = KeyMap(state)

    vb = "decoder.backbone.body.model."
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        km.key(f"backbone.{key}", vb + key)
    km.vit_blocks("backbone.blocks.", vb + "blocks.", vit.depth)
    km.prefix("backbone.norm.", "decoder.backbone.output_norms.3.")

    d = "decoder."
    km.prefix(f"{DEC}scale_embed.0.", f"{d}skip_proj.2.")  # after block depth/4 -> stage 2 (transposed conv)
    km.prefix(f"{DEC}scale_embed.1.", f"{d}skip_proj.1.")  # after block depth/2 -> stage 1
    km.skip(f"{DEC}scale_embed.2.", UNUSED + " (the level after block 3 depth/4 is not added anywhere)")
    stages = len({k.split(".")[3] for k in state if k.startswith(f"{DEC}invpt.invpt_stages.")})
    for i, rt in enumerate(names):
        t = mtvision_task(rt)
        for j in (0, 1):
            km.prefix(f"{DEC}preliminary_decoder.{rt}.{j}.conv.", f"{d}preliminary.{t}.{j}.0.")
            km.prefix(f"{DEC}preliminary_decoder.{rt}.{j}.bn1.", f"{d}preliminary.{t}.{j}.1.")
        km.prefix(f"{DEC}intermediate_head.{rt}.", f"{d}aux_heads.{t}.")
        km.prefix(f"{DEC}invpt.mix_proj.{rt}.0.", f"{d}embed.{t}.")
        km.prefix(f"{DEC}invpt.mt_proj.{rt}.", f"{d}final.{t}.")
        km.prefix(f"heads.{rt}.linear_pred.", f"{d}heads.{t}.")
        for k in range(stages):
            stage = f"{DEC}invpt.invpt_stages.{k}."
            if k:
                km.prefix(f"{stage}patch_embed.{i}.proj.", f"{d}up_embed.{k}.{t}.")
                km.prefix(f"{DEC}invpt.redu_chan.{k}.{i}.", f"{d}readout.{k}.{t}.")
            km.prefix(f"{stage}blocks.0.attn.conv_proj_q.{i}.conv.", f"{d}blocks.{k}.attn.conv_q.{t}.op.0.")
            km.prefix(f"{stage}blocks.0.attn.conv_proj_q.{i}.bn.", f"{d}blocks.{k}.attn.conv_q.{t}.op.1.")
    for k in range(stages):
        stage = f"{DEC}invpt.invpt_stages.{k}.blocks.0."
        for p in ("norm1", "norm2", "attn.proj_q", "attn.proj_k", "attn.proj_v", "attn.proj"):
            km.prefix(f"{stage}{p}.", f"{d}blocks.{k}.{p}.")
        km.prefix(f"{stage}mlp.fc1.", f"{d}blocks.{k}.mlp.0.")
        km.prefix(f"{stage}mlp.fc2.", f"{d}blocks.{k}.mlp.2.")
        if k:
            km.prefix(f"{stage}attn.fuse_attn.", f"{d}blocks.{k}.attn.fuse_message.")
        km.prefix(f"{DEC}invpt.norm_mts.{k}.", f"{d}readout_norm.{k}.")
    km.skip(f"{DEC}invpt.invpt_stages.0.blocks.0.attn.fuse_attn.", UNUSED + " (stage 0 has no previous scores)")
    km.skip(f"{DEC}invpt.redu_chan.0.", UNUSED + " (stage 0 is read out at its own width)")
    km.skip(f"{DEC}invpt.norm_mt.", UNUSED)
    check_all_used(state, km.used, km.skipped)

    first = names[0]
    task_channels = int(state[f"{DEC}intermediate_head.{first}.weight"].shape[1])
    dim0 = int(state[f"{DEC}invpt.mix_proj.{first}.0.weight"].shape[0])
    heads = int(state[f"{DEC}invpt.invpt_stages.1.blocks.0.attn.fuse_attn.weight"].shape[0]) if stages > 1 else 2
    options = {"task_channels": task_channels, "prediction_channels": dim0 - task_channels, "num_stages": stages,
               "num_heads": heads, "kv_strides": [2 << k for k in range(stages)]}
    config = release_vit_config(state, names, vit, dataset, "invpt", options)
    return Conversion(config, km.out, km.skipped)
