"""M3ViT (Liang et al., "M3ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task
Learning with Model-Accelerator Co-design", NeurIPS 2022), as released in VITA-Group/M3ViT with its
README's training command (ViT-S/16, 16 experts, top-4, experts of hidden width 1 x d, one gate per
task, `--vmoe_noisy_std 0`).

- Backbone (`M3ViTBackbone`): a timm ViT whose MLP in every other block (1, 3, ..., 11) is a
  task-routed `MoE`; the release's ViT-S has 12 attention heads (`backbone.kwargs.num_heads: 12`;
  DeiT-S weights fit it) and no final norm.  Gate ("release"): softmax over all experts, the
  top-4 probabilities kept without renormalisation, kaiming-uniform gate and FastMoE expert
  initialisation, fixed noise scale `gate_noise_std` / E in training (0 as released), balancing
  loss 0.01 x (cv²(importance) + cv²(hard load)) with the unbiased variance, per MoE layer and task.
- Head per task (`PUPHead`, the release's VisionTransformerUpHead "PUP"): the tokens of the last
  feature index (release: block 11) without the class token, a LayerNorm (eps 1e-6), four
  conv3x3-BN-ReLU at `head_channels` (256) with x2 bilinear upsampling after the first three, a
  1x1 convolution to the task's outputs, x2 bilinear: stride 1 for 16-pixel patches.
- Task-attention modules (`TaskAttentionModule`, the release's TamModule), in training only: at
  each level of `tam_levels` (0: after the head's second conv, stride 8; 1: third, stride 4; 2:
  fourth, stride 2) the T tasks' head features are fused into a second prediction per task,
  supervised with the task's loss (`deep_supervision[t]`, one per level).  They run when all of
  the model's tasks (at least two) are computed in training, and are dropped at inference.

Differences with the release: inputs are zero-padded to a multiple of the patch size and the
outputs cropped back (the release asserts its fixed training size); the position embedding is
resampled by timm for other grids (the release's is fixed at the training grid); the task
pathways branch at the first MoE block instead of re-running the shared first block per task
(the same numbers); the TAM's weighting of the task features generalises the release's cases T =
2..5 (the first floor(T / 2) tasks weighted by B / floor(T / 2), the others by (1 - B) / the rest).

Former mtvision variant, kept as an option: `gate="shazeer"` (softmax over the top-k logits,
zero-initialised gates, trainable Shazeer noise, population variance, truncated-normal experts).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import unknown_name
from mtvision.models.decoders.base import MOE_BALANCE, BackboneFactory, ModelOutput, MultiTaskDecoder, model_output
from mtvision.models.decoders.invpt import crop_to, pad_to_multiple
from mtvision.models.heads import resize_to
from mtvision.models.m3vit_backbone import M3VIT_EVERY, M3VIT_NUM_EXPERTS, M3VIT_TOP_K, M3ViTBackbone
from mtvision.tasks import Task

GATES = ("release", "shazeer")
TAM_LEVELS = (0, 1, 2)


def gate_options(gate: str, num_experts: int, noise_std: float) -> dict[str, object]:
    """`MoE` options of an M3ViT gate: "release" (`NoisyGate_VMoE` with a fixed noise scale
    noise_std / E) or "shazeer" (mtvision's former noisy top-k gate)."""
    if gate not in GATES:
        raise unknown_name("M3ViT gate", gate, GATES)
    if gate == "shazeer":
        return {"noisy_gating": True}
    return {
        "noisy_gating": False,
        "gate_values": "softmax_top_k",
        "gate_init": "kaiming_uniform",
        "expert_init": "kaiming_uniform",
        "fixed_noise_std": noise_std / num_experts,
        "balance_variance": "unbiased",
    }


def _up2(x: Tensor) -> Tensor:
    return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False)


class PUPHead(nn.Module):
    """LayerNorm on the token map, 4 x (conv3x3 with bias, BN, ReLU) with x2 bilinear steps after
    the first three, conv1x1, x2 bilinear.  `forward` returns the prediction and the features after
    the second, third and fourth convolutions (the TAM levels 0, 1, 2)."""

    def __init__(self, embed_dim: int, channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.convs = nn.ModuleList(nn.Conv2d(embed_dim if i == 0 else channels, channels, 3, padding=1) for i in range(4))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(4))
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        """`tokens`: the N x C x h x w token map."""
        x = self.norm(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        levels = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i > 0:
                levels.append(x)
            if i < 3:
                x = _up2(x)
        return _up2(self.out(x)), levels


def _conv_bn(cin: int, cout: int, stride: int = 1, transposed: bool = False) -> nn.Sequential:
    conv = (nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1) if transposed
            else nn.Conv2d(cin, cout, 3, stride=stride, padding=1))
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class TaskAttentionModule(nn.Module):
    """M3ViT's task-attention module on T same-shaped task features F_t (C channels).

    Z = cat_t F_t; B = sigmoid(BN(conv(ReLU(BN(conv(Z)))))) (`mix`, `balance`); the features
    weighted by B (the first floor(T/2) tasks, each / floor(T/2)) and 1 - B (the others, each /
    their number), concatenated, pass `fuse` (conv-BN-ReLU), two stride-2 conv-BN-ReLU (`down`)
    and two stride-2 transposed conv-BN (`up`, ReLU between, sigmoid last): the mask M.  Per task,
    conv-BN-ReLU (`refine[t]`) on cat_t F_t (1 + M) and a 1x1 convolution (`predict[t]`).
    """

    def __init__(self, tasks: Mapping[str, Task], channels: int):
        super().__init__()
        self.task_names = list(tasks)
        wide = len(self.task_names) * channels
        self.mix = _conv_bn(wide, channels)
        self.balance = _conv_bn(channels, channels)
        self.fuse = _conv_bn(wide, channels)
        self.down = nn.ModuleList(_conv_bn(channels, channels, stride=2) for _ in range(2))
        self.up = nn.ModuleList(_conv_bn(channels, channels, transposed=True) for _ in range(2))
        self.refine = nn.ModuleDict({t: _conv_bn(wide, channels) for t in self.task_names})
        self.predict = nn.ModuleDict({t: nn.Conv2d(channels, s.out_channels, 1) for t, s in tasks.items()})

    def forward(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = self.task_names
        z = torch.cat([feats[t] for t in names], 1)
        b = torch.sigmoid(self.balance(F.relu(self.mix(z))))
        first = len(names) // 2
        weighted = [feats[t] * (b / first if i < first else (1 - b) / (len(names) - first)) for i, t in enumerate(names)]
        m = F.relu(self.fuse(torch.cat(weighted, 1)))
        for down in self.down:
            m = F.relu(down(m))
        m = torch.sigmoid(self.up[1](F.relu(self.up[0](m))))
        m = resize_to(m, z.shape[-2:])  # a no-op at sizes that are multiples of 4 x the level's stride
        joint = torch.cat([feats[t] * (1 + m) for t in names], 1)
        return {t: self.predict[t](F.relu(self.refine[t](joint))) for t in names}


class M3ViTDecoder(MultiTaskDecoder):
    """M3ViT as released (see the module docstring).  `forward(images, [t])` runs the shared
    blocks, task t's expert pathway and head only.

    In training the output carries the regularizer `MOE_BALANCE`: the sum of every MoE layer's
    balancing loss for this forward (weighted by `balance_weight`), added to the total loss once
    (it is not a task).  Statistics: `experts/blocks.<i>/<task>`, the (token, expert) assignments
    per expert of each MoE block, and `experts/blocks.<i>/<task>/dropped`, those dropped by capacity.

    Shared representation: the token state entering the first MoE block (where the pathways
    branch).  Task parameters: task t's TAM layers (`refine[t]`, `predict[t]`) and, when no TAM
    runs (one task or `tam_levels: []`), its gates and head.  With TAM (the release) every task's
    pathway, gates and head included, also feeds every other task's TAM predictions: they are
    shared, after the representation (use the 'params' calibration level for them).

    Options:
        num_experts, top_k, every: MoE layout (the release: 16 experts, top-4, every other block).
        expert_mlp_ratio: experts' hidden width / token width (the release: 1.0); None: the dense
            MLP's width (experts then start as copies of the dense MLP; see `moeify_vit`).
        expert_init: "auto", "copy" or "random" (see `moeify_vit`).
        routing: "per_task" (a gate per task, the release) or "task_embedding" (shared gate, task
            embedding input).
        capacity_factor: expert capacity factor (None: no token is dropped, as FastMoE).
        balance_weight: weight of the balancing loss (the release's 0.01).
        gate: "release" or "shazeer" (see `gate_options`).
        gate_noise_std: the release's --vmoe_noisy_std (noise scale per logit: / num_experts), "release" gate.
        init_noise_std: relative noise added to experts copied from a dense MLP.
        head_channels: width of the PUP heads and the TAMs (256).
        tam_levels: head levels with a task-attention module (the release: 0, 1, 2 on NYUD; 0, 1 on
            PASCAL, whose config turns level 2 off); [] for none.
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        num_experts: int = M3VIT_NUM_EXPERTS,
        top_k: int = M3VIT_TOP_K,
        every: int = M3VIT_EVERY,
        expert_mlp_ratio: float | None = 1.0,
        expert_init: str = "auto",
        routing: str = "per_task",
        capacity_factor: float | None = None,
        balance_weight: float = 1e-2,
        gate: str = "release",
        gate_noise_std: float = 0.0,
        init_noise_std: float = 0.01,
        head_channels: int = 256,
        tam_levels: Sequence[int] = TAM_LEVELS,
    ):
        super().__init__(tasks)
        levels = sorted(set(int(v) for v in tam_levels))
        if any(v not in TAM_LEVELS for v in levels):
            raise ValueError(f"m3vit tam_levels must be among {TAM_LEVELS}, got {list(tam_levels)}")
        backbone = make_backbone()
        embed_dim = backbone.channels[-1]
        hidden = None if expert_mlp_ratio is None else max(1, int(round(embed_dim * expert_mlp_ratio)))
        self.backbone = M3ViTBackbone(
            backbone,
            list(tasks),
            num_experts=num_experts,
            top_k=top_k,
            every=every,
            expert_hidden=hidden,
            noise_std=init_noise_std,
            init=expert_init,
            routing=routing,
            capacity_factor=capacity_factor,
            balance_weight=balance_weight,
            **gate_options(gate, num_experts, gate_noise_std),
        )
        self.heads = nn.ModuleDict({n: PUPHead(embed_dim, head_channels, t.out_channels) for n, t in tasks.items()})
        self.tam_levels = levels if len(tasks) > 1 else []
        self.tam = nn.ModuleDict({str(v): TaskAttentionModule(tasks, head_channels) for v in self.tam_levels})

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.backbone.strides[0])  # any input size: pad, then crop back
        psize = tuple(padded.shape[-2:])
        run = self.backbone(padded, tasks)
        heads = {t: self.heads[t](run.features[t][-1]) for t in tasks}
        out = {t: crop_to(pred, psize, size) for t, (pred, _) in heads.items()}
        deep: dict[str, list[Tensor]] = {}
        if self.training and self.tam_levels and set(tasks) == set(self.tasks):
            for v in self.tam_levels:
                tam = self.tam[str(v)]({t: levels[v] for t, (_, levels) in heads.items()})
                for t in tasks:
                    deep.setdefault(t, []).append(crop_to(tam[t], psize, size))
        regularizers = {MOE_BALANCE: run.balance_loss} if self.training and run.balance_loss is not None else {}
        stats: dict[str, Tensor] = {}
        for i, s in run.stats.items():
            for row, load in s.usage.items():
                stats[f"experts/blocks.{i}/{row}"] = load.float()
                stats[f"experts/blocks.{i}/{row}/dropped"] = s.dropped_by_row[row].float()
        return model_output(out, deep_supervision=deep, regularizers=regularizers, shared=[run.shared], stats=stats)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for tam in self.tam.values():
            yield from tam.refine[task].parameters()
            yield from tam.predict[task].parameters()
        if not self.tam_levels:
            yield from self.heads[task].parameters()
            yield from self.backbone.task_gate_parameters(task)
