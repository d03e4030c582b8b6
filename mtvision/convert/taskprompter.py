"""Released TaskPrompter checkpoints (prismformore/Multi-Task-Transformer, `TaskPrompter/`) ->
mtvision's `taskprompter` decoder (mtvision/models/decoders/taskprompter.py).

The release: `backbone.*` holds the ViT/16 (ViT-L for NYUD and PASCAL, ViT-B for PASCAL) together
with the task prompts, each block's size-tied token transforms (`attn.token_trans` C -> N and
`attn.token_trans1` N -> C, N the patch count of the build size) and the per-level read-outs;
`heads.<task>` the conv heads.  The backbone size is read from the shapes; the input size must fit
both `pos_embed` and the token transforms (see mtvision/convert/release_vit.py).  The number of
channel-prompt windows (`chan_nheads`) is not in any shape: it is read off the release config that
the read-out widths identify.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtvision.convert.base import Conversion, ConversionError, check_all_used, check_dataset
from mtvision.convert.release_vit import KeyMap, infer_vit, mtvision_task, release_tasks, release_vit_config

CHANNEL_WINDOWS = {(768, 768): 16, (300, 350): 1, (780, 1024): 16}
"""(embed_dim, final_embed_dim) of the released configs -> their chan_nheads: NYUD ViT-L 768/768/16,
PASCAL ViT-L 300/350/1, PASCAL ViT-B 780/1024/16."""


def convert_taskprompter(
    state: Mapping[str, Tensor], dataset: str, input_size: tuple[int, int] | None = None, backbone: str | None = None
) -> Conversion:
    """A TaskPrompter release state dict of `dataset` -> the mtvision `taskprompter` model."""
    check_dataset(dataset)
    if "backbone.task_prompts" not in state:
        raise ConversionError("no backbone.task_prompts: not a TaskPrompter checkpoint (InvPT's is format 'invpt')")
    names = release_tasks(state, dataset, "heads.{t}.linear_pred.weight")
    vit = infer_vit(state, "backbone.", dataset, input_size, backbone)
    patches = vit.grid[0] * vit.grid[1]
    trans = state.get("backbone.blocks.0.attn.token_trans.weight")
    if trans is None or trans.shape[0] != patches:
        got = None if trans is None else int(trans.shape[0])
        raise ConversionError(f"the token transforms are for {got} patches, the input size {vit.input_size} has {patches}")
    km = KeyMap(state)

    pv, vb = "decoder.prompter.", "decoder.prompter.vit."
    for key in ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        km.key(f"backbone.{key}", vb + key)
    km.vit_blocks("backbone.blocks.", vb + "blocks.", vit.depth)
    km.key("backbone.task_prompts", pv + "prompts")
    km.prefix("backbone.norm.", pv + "final_norm.")
    for b in range(vit.depth):
        km.prefix(f"backbone.blocks.{b}.attn.token_trans.", f"{pv}to_channel.{b}.")
        if b < vit.depth - 1:
            km.prefix(f"backbone.blocks.{b}.attn.token_trans1.", f"{pv}from_channel.{b}.")
    km.skip(f"backbone.blocks.{vit.depth - 1}.attn.token_trans1.",
            "built by the release but never used: the prompts leaving the last block reach nothing")
    ctr = any(k.startswith("backbone.ctr_attn_conv.") for k in state)
    for rt in names:
        t = mtvision_task(rt)
        for j in range(4):
            km.prefix(f"backbone.fea_fuse.{j}.{rt}.", f"{pv}fuse.{j}.{t}.")
            km.prefix(f"backbone.fea_decode_spa.{j}.{rt}.0.", f"{pv}spatial_proj.{j}.{t}.")
            km.prefix(f"backbone.fea_decode_chan.{j}.{rt}.0.", f"{pv}channel_proj.{j}.{t}.")
            if ctr:
                km.prefix(f"backbone.ctr_attn_conv.{j}.{rt}.", f"{pv}ctr.{j}.{t}.")
        km.prefix(f"heads.{rt}.mt_proj.", f"decoder.heads.{t}.body.")
        km.prefix(f"heads.{rt}.linear_pred.", f"decoder.heads.{t}.out.")
    check_all_used(state, km.used, km.skipped)
    # timm's ViT keeps a class token, which the release has not: never read (the prompts replace it)
    km.out[vb + "cls_token"] = torch.zeros(1, 1, vit.width)

    first = names[0]
    feature_channels = int(state[f"backbone.fea_decode_spa.0.{first}.0.weight"].shape[0])
    embed_channels = int(state[f"backbone.fea_fuse.0.{first}.0.weight"].shape[0])
    windows = CHANNEL_WINDOWS.get((feature_channels, embed_channels))
    if windows is None:
        raise ConversionError(
            f"read-out widths {feature_channels}/{embed_channels} match no released TaskPrompter config "
            f"({', '.join(f'{a}/{b}' for a, b in CHANNEL_WINDOWS)}), so its channel-window count is unknown"
        )
    prompt_len = int(state["backbone.task_prompts"].shape[0]) // len(names)
    options = {"prompt_len": prompt_len, "channel_heads": windows, "feature_channels": feature_channels,
               "embed_channels": embed_channels, "cross_task_reweighting": ctr}
    config = release_vit_config(state, names, vit, dataset, "taskprompter", options)
    return Conversion(config, km.out, km.skipped)
