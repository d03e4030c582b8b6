"""M3ViT (Liang et al., NeurIPS 2022): a ViT whose MLP in every other block is a task-routed MoE.

`moeify_vit(vit, tasks)` turns a timm `VisionTransformer` into the M3ViT layout in place: the MLP of
blocks 1, 3, 5, ... (`i % every == every - 1`, as in the released code) becomes a `MoE` with one
top-k gate per task (multi-gate MoE; 16 experts, top-4 by default, the released training
command's `--moe_experts 16 --moe_top_k 4 --multi_gate True`; the gate's behaviour comes from the
`MoE` options passed through, which `mtvision/models/decoders/m3vit.py` sets to the release's).
When the experts have the dense MLP's hidden width, each expert starts as a copy of the dense MLP
plus Gaussian noise of `noise_std` x each tensor's standard deviation (sparse upcycling: with a
zero-initialised, renormalising gate the layer then computes the dense MLP).  M3ViT's released
runs use experts of hidden width 1 x d (`--moe_mlp_ratio 1`), which cannot be copied from a 4 x d
MLP; those experts start from their own initialisation (the `MoE`'s `expert_init`), as in the
released code.

`M3ViTBackbone` runs the blocks before the first MoE block once for all tasks (the shared part),
then branches: the token state is repeated once per requested task along the batch axis, and every
later block runs on the stacked task pathways, each MoE block routing chunk t with task t's gate
(one expert dispatch for all tasks).  With one task, only that task's pathway runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from timm.layers import Mlp
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mtvision.errors import unknown_name
from mtvision.models.backbones import Backbone, BackboneError
from mtvision.models.decoders.base import graph_boundary
from mtvision.models.moe import MoE, MoEOutput, MoEStats

M3VIT_NUM_EXPERTS = 16
M3VIT_TOP_K = 4
M3VIT_EVERY = 2
INITS = ("auto", "copy", "random")


class M3ViTError(BackboneError):
    """A ViT cannot be turned into (or loaded as) an M3ViT backbone."""


class MoEBlock(nn.Module):
    """A timm ViT block whose MLP is a task-routed `MoE`: x + attn(norm1 x); x + moe(norm2 x, tasks)."""

    def __init__(self, block: nn.Module, moe: MoE):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.ls2, self.drop_path2 = block.norm2, block.ls2, block.drop_path2
        self.moe = moe

    def forward(self, x: Tensor, tasks: str | Sequence[str] | None = None) -> MoEOutput:
        """The block's tokens, with the MoE call's balancing loss and routing statistics."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        moe = self.moe(self.norm2(x), tasks)
        return moe._replace(output=x + self.drop_path2(self.ls2(moe.output)))


def _dense_mlp(block: nn.Module, index: int) -> Mlp:
    mlp = getattr(block, "mlp", None)
    ok = (
        isinstance(mlp, Mlp)
        and isinstance(mlp.act, nn.GELU)
        and mlp.act.approximate == "none"
        and isinstance(mlp.norm, nn.Identity)
        and isinstance(mlp.fc1, nn.Linear)
    )
    if not ok:
        raise M3ViTError(
            f"block {index}'s MLP ({type(mlp).__name__}) is not a plain Linear-GELU-Linear MLP; "
            "M3ViT experts replace timm `Mlp` layers with exact GELU (plain ViT/DeiT models)"
        )
    return mlp


@torch.no_grad()
def copy_dense_mlp(
    moe: MoE, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor, noise_std: float = 0.01
) -> None:
    """Set every expert of `moe` to the dense MLP (fc1: h x d, fc2: d x h, in nn.Linear layout) plus
    Gaussian noise of `noise_std` x each tensor's standard deviation (M3ViTError on a shape mismatch)."""
    expected = {
        "fc1.weight": (moe.hidden, moe.dim),
        "fc1.bias": (moe.hidden,),
        "fc2.weight": (moe.dim, moe.hidden),
        "fc2.bias": (moe.dim,),
    }
    given = {"fc1.weight": fc1_weight, "fc1.bias": fc1_bias, "fc2.weight": fc2_weight, "fc2.bias": fc2_bias}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise M3ViTError(
                f"dense MLP {name} has shape {tuple(given[name].shape)} but the experts need {shape} "
                f"(experts of hidden width {moe.hidden}, tokens of width {moe.dim})"
            )
    for param, dense in ((moe.w1, fc1_weight), (moe.b1, fc1_bias), (moe.w2, fc2_weight), (moe.b2, fc2_bias)):
        dense = dense.to(param.dtype)
        scale = float(dense.std()) if dense.numel() > 1 else 0.0
        param.copy_(dense.unsqueeze(0).expand_as(param))
        if noise_std > 0 and scale > 0:
            param.add_(torch.randn_like(param) * (noise_std * scale))


def moeify_vit(
    vit: VisionTransformer,
    tasks: Sequence[str],
    num_experts: int = M3VIT_NUM_EXPERTS,
    top_k: int = M3VIT_TOP_K,
    every: int = M3VIT_EVERY,
    expert_hidden: int | None = None,
    noise_std: float = 0.01,
    init: str = "auto",
    routing: str = "per_task",
    **moe_options,
) -> list[int]:
    """Replace the MLP of blocks i with i % every == every - 1 by task-routed MoE layers, in place.

    expert_hidden: experts' hidden width (None: the dense MLP's).  init: "copy" (each expert = the
    dense MLP + noise; an error when the widths differ), "random" (ViT initialisation), "auto" (copy
    when the widths match).  Further options go to `MoE` (capacity_factor, balance_weight, ...).
    Returns the indices of the MoE blocks.
    """
    if init not in INITS:
        raise unknown_name("M3ViT expert init", init, INITS)
    if every < 1:
        raise M3ViTError(f"every must be >= 1, got {every}")
    indices = [i for i in range(len(vit.blocks)) if i % every == every - 1]
    if not indices:
        raise M3ViTError(f"a ViT of {len(vit.blocks)} blocks has no block i with i % {every} == {every - 1}")
    for i in indices:
        block = vit.blocks[i]
        if isinstance(block, MoEBlock):
            raise M3ViTError(f"block {i} is already a mixture-of-experts block")
        mlp = _dense_mlp(block, i)
        dense_hidden, dim = mlp.fc1.out_features, mlp.fc1.in_features
        hidden = int(expert_hidden or dense_hidden)
        if init == "copy" and hidden != dense_hidden:
            raise M3ViTError(
                f"cannot copy block {i}'s dense MLP (hidden {dense_hidden}) into experts of hidden {hidden}; "
                "use init='random' or expert_hidden equal to the dense width"
            )
        moe = MoE(dim, hidden, num_experts, top_k, tasks=tasks, routing=routing, **moe_options)
        if init != "random" and hidden == dense_hidden:
            copy_dense_mlp(moe, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, noise_std)
        vit.blocks[i] = MoEBlock(block, moe.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype))
    return indices


class M3ViTFeatures(NamedTuple):
    """What the M3ViT backbone returns: per task, its stride-p token maps (one per feature index);
    the token state entering the first MoE block (where the task pathways branch); the summed
    balancing loss of the MoE blocks (None when none applies); per MoE block, its routing stats."""

    features: dict[str, list[Tensor]]
    shared: Tensor
    balance_loss: Tensor | None
    stats: dict[int, MoEStats]


class M3ViTBackbone(nn.Module):
    """A timm ViT with task-routed MoE blocks, returning per-task stride-p token maps.

    Built from a `Backbone` made by `create_backbone` on a plain timm ViT; its feature indices
    (`backbone.out_indices`) are the blocks whose outputs are returned, and they must not precede
    the first MoE block (the task pathways branch there).  `forward(images, tasks)` returns an
    `M3ViTFeatures`.
    """

    def __init__(self, backbone: Backbone, tasks: Sequence[str], **moe_options):
        super().__init__()
        body = backbone.body
        if not (isinstance(body, FeatureGetterNet) and isinstance(body.model, VisionTransformer)):
            raise M3ViTError(f"M3ViT needs a plain timm ViT backbone (vit_*, deit_*), got {backbone.name!r}")
        self.name = backbone.name
        self.vit: VisionTransformer = body.model
        self.tasks = list(tasks)
        self.moe_blocks = moeify_vit(self.vit, self.tasks, **moe_options)
        self.branch = min(self.moe_blocks)
        self.taps = sorted(int(i) for i in body.out_indices)
        if self.taps[0] < self.branch:
            raise M3ViTError(
                f"feature index {self.taps[0]} precedes the first MoE block ({self.branch}), where the task "
                f"pathways branch; use backbone.out_indices >= {self.branch}"
            )
        patch = self.vit.patch_embed.patch_size
        self.channels = [self.vit.embed_dim] * len(self.taps)
        self.strides = [int(patch[0] if isinstance(patch, (tuple, list)) else patch)] * len(self.taps)

    def moe_layers(self) -> dict[int, MoE]:
        """Block index -> its MoE layer."""
        return {i: self.vit.blocks[i].moe for i in self.moe_blocks}

    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding, position embedding and pre-norm: the tokens entering block 0."""
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def _run_dense(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.vit.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> M3ViTFeatures:
        names = list(self.tasks if tasks is None else tasks)
        for t in names:
            if t not in self.tasks:
                raise unknown_name("task of this M3ViT backbone", t, self.tasks)
        x = self.embed(images)
        for block in self.vit.blocks[: self.branch]:
            x = self._run_dense(block, x)
        (x,) = graph_boundary([x])
        h = x.repeat(len(names), 1, 1) if len(names) > 1 else x  # task-major stack of the pathways
        route = names if len(names) > 1 else names[0]
        maps, losses, stats = [], [], {}
        grid = self.vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        for i in range(self.branch, len(self.vit.blocks)):
            block = self.vit.blocks[i]
            if isinstance(block, MoEBlock):
                h, loss, stats[i] = block(h, route)
                if loss is not None:
                    losses.append(loss)
            else:
                h = self._run_dense(block, h)
            if i in self.taps:
                tokens = h[:, self.vit.num_prefix_tokens :]
                maps.append(tokens.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2))
        per_task = [m.chunk(len(names)) for m in maps]
        features = {t: [chunks[j] for chunks in per_task] for j, t in enumerate(names)}
        return M3ViTFeatures(features, x, torch.stack(losses).sum() if losses else None, stats)

    def task_gate_parameters(self, task: str) -> list[nn.Parameter]:
        """`task`'s own gate parameters in every MoE layer."""
        return [p for moe in self.moe_layers().values() for p in moe.gate_parameters(task)]


_DENSE_MLP_KEY = re.compile(r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$")
_DENSE_ONLY = ("head.", "head_drop.", "fc_norm.", "norm.")


def load_dense_weights(
    backbone: M3ViTBackbone, state_dict: Mapping[str, Tensor], noise_std: float = 0.01, experts: str = "auto"
) -> None:
    """Load a dense timm ViT state dict into an M3ViT backbone: every tensor where it belongs, and each
    MoE block's dense MLP copied into all its experts (plus noise).  experts: "copy" (widths must
    match), "random" (keep the experts as they are) or "auto" (copy when the widths match).
    Position embeddings are resampled the way timm does; a shape that does not fit, a missing or
    an unknown tensor is an M3ViTError."""
    if experts not in INITS:
        raise unknown_name("M3ViT expert init", experts, INITS)
    vit = backbone.vit
    try:
        filtered = checkpoint_filter_fn(dict(state_dict), vit)
    except Exception as exc:  # timm's resampling raises on incompatible grids
        raise M3ViTError(f"cannot adapt the dense ViT weights to {backbone.name!r}: {exc}") from exc
    own = vit.state_dict()
    depth = len(vit.blocks)
    moe_mlps: dict[int, dict[str, Tensor]] = {}
    plain: dict[str, Tensor] = {}
    for key, value in filtered.items():
        match = _DENSE_MLP_KEY.match(key)
        if match and int(match[1]) in backbone.moe_blocks:
            moe_mlps.setdefault(int(match[1]), {})[f"{match[2]}.{match[3]}"] = value
            continue
        block = re.match(r"blocks\.(\d+)\.", key)
        if key not in own:
            if key.startswith(_DENSE_ONLY) or (block and int(block[1]) >= depth):
                continue  # classifier, final norm and pruned blocks of the features-only model
            raise M3ViTError(f"the dense weights hold {key!r}, which {backbone.name!r} does not have")
        if tuple(value.shape) != tuple(own[key].shape):
            raise M3ViTError(
                f"dense weight {key!r} has shape {tuple(value.shape)} but {backbone.name!r} needs {tuple(own[key].shape)}"
            )
        plain[key] = value
    missing = [k for k in own if ".moe." not in k and k not in plain]
    missing += [
        f"blocks.{i}.mlp.{p}"
        for i in backbone.moe_blocks
        for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
        if p not in moe_mlps.get(i, {})
    ]
    if missing:
        raise M3ViTError(f"{len(missing)} tensors are missing from the dense weights, e.g. {missing[:5]}")
    vit.load_state_dict(plain, strict=False)
    for i, mlp in moe_mlps.items():
        moe = vit.blocks[i].moe
        if experts == "random" or (experts == "auto" and mlp["fc1.weight"].shape[0] != moe.hidden):
            continue
        copy_dense_mlp(moe, mlp["fc1.weight"], mlp["fc1.bias"], mlp["fc2.weight"], mlp["fc2.bias"], noise_std)
