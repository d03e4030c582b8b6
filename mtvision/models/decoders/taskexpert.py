"""TaskExpert (Ye & Xu, "TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial
Mixture-of-Experts", ICCV 2023): per-layer expert banks, per-task per-pixel gates, and a per-task
feature memory that is both written at every layer and read as an extra expert by the next one.

For each backbone layer l (fine to coarse, all brought to one grid of stride `feature_stride`):

    experts      X_e^l = ReLU(BN(W_e^l · x^l))                        e = 1..E  (1x1 conv = linear on tokens)
    gate         g_t^l = softmax(G_t^l([x^l ; M_t^{l-1}]))             per pixel, over E experts (+1: the memory)
    assemble     F_t^l = Σ_e g_{t,e}^l · X_e^l  (+ g_{t,E+1}^l · M_t^{l-1}  for l ≥ 1)
    write        M_t^l = M_t^{l-1} + BN(V_t^l · F_t^l)                 (M_t^0 = BN(V_t^0 · F_t^0))

and task t's head reads the last memory M_t^{L-1}.

Optional balancing loss (not in the paper; `balance_weight` > 0): in training,

    aux = balance_weight · Σ_l Σ_t cv²(I_t^l),    I_{t,e}^l = mean over images and pixels of g_{t,e}^l

over the E experts only (the memory slot is left out: it is the task's own carried feature, not
an expert to balance), returned as the regularizer `MOE_BALANCE`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.decoders.base import (
    MOE_BALANCE,
    BackboneFactory,
    ModelOutput,
    MultiTaskDecoder,
    graph_boundary,
    model_output,
)
from mtvision.models.decoders.invpt import DecoderStrideError, check_strides, crop_to, pad_to_multiple
from mtvision.models.heads import TaskHead, make_norm, resize_to
from mtvision.models.moe import MoEError, cv_squared
from mtvision.tasks import Task


def to_grid(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bring a map to `size`: area averaging when it shrinks, bilinear interpolation otherwise."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.interpolate(x, size=tuple(size), mode="area")
    return resize_to(x, size)


class MemorialPass(NamedTuple):
    """What one pass of the memorial MoE layers computed: per layer, the assembled features F_t^l
    and the gate weights g_t^l of each task; the last memories M_t^{L-1}; the balancing terms."""

    features: list[dict[str, Tensor]]
    gates: list[dict[str, Tensor]]
    memory: dict[str, Tensor]
    balance: list[Tensor]


class ExpertBank(nn.Module):
    """E experts, each a 1x1 conv (a linear layer on tokens) + norm + ReLU, run as one convolution with
    E x channels outputs (the same function: batch norm is per channel, group norm groups never
    straddle two experts)."""

    def __init__(self, in_channels: int, num_experts: int, channels: int, norm: str = "bn"):
        super().__init__()
        self.num_experts, self.channels = num_experts, channels
        self.conv = nn.Conv2d(in_channels, num_experts * channels, 1, bias=False)
        if norm == "gn":
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
            self.norm: nn.Module = nn.GroupNorm(num_experts * groups, num_experts * channels)
        else:
            self.norm = make_norm(norm, num_experts * channels)

    def forward(self, x: Tensor) -> Tensor:
        """N x C x H x W -> N x E x channels x H x W."""
        y = F.relu(self.norm(self.conv(x)))
        n, _, h, w = y.shape
        return y.view(n, self.num_experts, self.channels, h, w)


class TaskExpertDecoder(MultiTaskDecoder):
    """TaskExpert: memorial mixture-of-experts at every backbone layer the backbone returns (see the
    module docstring for the computation).

    Layers: the backbone's returned levels (`backbone.out_indices`); ViT configs take 4 evenly spaced
    blocks of ViT-L (6/12/18/24, as InvPT, the authors' previous model), CNNs their stages, which
    are resampled to one grid.  No deep supervision, and by default no auxiliary MoE loss (the paper
    trains with the task losses only, as far as we could verify).

    Balancing (ours, not in the paper): `balance_weight` > 0 adds, in training, the importance loss
    of Shazeer et al. (ICLR 2017) for every layer and task, summed (as M3ViT sums its MoE layers),
    as the regularizer `MOE_BALANCE` (absent when the weight is 0, in eval, or with one expert).  The
    importance of expert e is its gate weight averaged over images and pixels; the memory slot is
    excluded.  The loss recomputes the gates on detached inputs, so its gradient reaches only the
    gate convolutions: it changes the routing, not the features the gates read.

    Defaults and where they come from (the paper's text was not available to check and its code was
    never released, prismformore/Multi-Task-Transformer#28; treat the numbers as ours):
        num_experts: 9 (our reading of the paper's setting).
        channels: 256, the width of every expert, memory and head input (ours).
        feature_stride: the grid the experts work on; None: the backbone's finest stride, but not
            below 8 (a plain ViT: its patch stride 16, as in the paper; ResNet: 8, ours).
        head_stride: the memory is bilinearly upsampled to this stride before the heads (None: no
            upsampling; the ViT-L configs use 4, like InvPT's output).
        head_channels: hidden width of each task head (3x3 conv-norm-ReLU then 1x1), 64 (ours).
        norm: "bn" (the paper's experts are linear-BN-ReLU) or "gn".
        balance_weight: weight of the balancing loss above (0: none, as in the paper).

    Statistics: `experts/layer<l>/<task>`, the gate mass of each expert (summed over images, mean
    over pixels); from layer 1 on the last entry is the memory.

    Shared representation: the backbone feature maps (every task's gates and
    experts read every level).  The expert banks after them are shared parameters that no single
    tensor separates from the task parts: calibrate at the 'params' level to reach them.
    Task parameters: task t's gates and memory writes at every layer, and its head.
    `forward(images, [t])` runs the backbone and the experts, then only t's gates, memory and head.
    Inputs whose size is not a multiple of `size_divisor` are zero-padded and outputs cropped back.
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict[str, Task],
        num_experts: int = 9,
        channels: int = 256,
        feature_stride: int | None = None,
        head_stride: int | None = None,
        head_channels: int = 64,
        norm: str = "bn",
        balance_weight: float = 0.0,
    ):
        super().__init__(tasks)
        if num_experts < 1:
            raise MoEError(f"num_experts must be >= 1, got {num_experts}")
        if balance_weight < 0:
            raise MoEError(f"balance_weight must be >= 0, got {balance_weight}")
        self.backbone = make_backbone()
        strides, in_channels = list(self.backbone.strides), list(self.backbone.channels)
        check_strides(strides, "taskexpert")
        stride = feature_stride or max(min(strides), 8)
        check_strides([stride], "taskexpert")
        if not min(strides) <= stride <= max(strides):
            raise DecoderStrideError(
                f"taskexpert: feature_stride={stride} lies outside the backbone's strides {strides}; "
                "choose one between its finest and coarsest level"
            )
        head = head_stride or stride
        check_strides([head], "taskexpert")
        if head > stride:
            raise DecoderStrideError(f"taskexpert: head_stride={head} is coarser than feature_stride={stride}")
        self.task_names = list(tasks)
        self.num_experts, self.channels, self.balance_weight = num_experts, channels, float(balance_weight)
        self.feature_stride, self.output_stride = stride, head
        self.size_divisor = max(max(strides), stride)
        self.num_layers = len(strides)
        self.experts = nn.ModuleList(ExpertBank(c, num_experts, channels, norm) for c in in_channels)
        self.gates = nn.ModuleList(
            nn.ModuleDict({t: nn.Conv2d(c + (channels if i else 0), num_experts + (1 if i else 0), 1) for t in tasks})
            for i, c in enumerate(in_channels)
        )
        self.writes = nn.ModuleList(
            nn.ModuleDict(
                {
                    t: nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), make_norm(norm, channels))
                    for t in tasks
                }
            )
            for _ in in_channels
        )
        self.heads = nn.ModuleDict(
            {t: TaskHead(channels, s.out_channels, head_channels, norm=norm) for t, s in tasks.items()}
        )

    # ------------------------------------------------------------------ one layer
    def gate_inputs(self, layer: int, x: Tensor, memory: Tensor | None) -> Tensor:
        """What the gates of `layer` read: x on layer 0, [x ; M_t^{l-1}] after it."""
        return x if layer == 0 else torch.cat([x, memory], 1)

    def gate_weights(self, layer: int, task: str, x: Tensor, memory: Tensor | None) -> Tensor:
        """Task `task`'s per-pixel softmax weights at `layer`: N x E x H x W on layer 0, N x (E+1) x H x W
        after it (the last channel weighs the memory)."""
        logits = self.gates[layer][task](self.gate_inputs(layer, x, memory))
        return torch.softmax(logits.float(), dim=1).to(x.dtype)

    def balancing(self) -> bool:
        """Whether this forward adds the balancing loss (training, a positive weight, two experts or more)."""
        return self.training and self.balance_weight > 0 and self.num_experts > 1

    def balance_loss(self, layer: int, task: str, x: Tensor, memory: Tensor | None) -> Tensor:
        """balance_weight · cv² of the experts' importance (their gate weight averaged over images and
        pixels; the memory slot excluded), from the gate recomputed on detached inputs: the gradient
        reaches the gate convolution only."""
        inputs = self.gate_inputs(layer, x, memory).detach()
        logits = self.gates[layer][task](inputs).float()
        importance = torch.softmax(logits, dim=1)[:, : self.num_experts].mean(dim=(0, 2, 3))
        return self.balance_weight * cv_squared(importance)

    def assemble(
        self, layer: int, x: Tensor, memory: dict[str, Tensor], tasks: Sequence[str]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], list[Tensor]]:
        """One memorial MoE layer on the gridded backbone feature `x`: the assembled task features F_t,
        the updated memories M_t, the gate weights of `tasks` (`memory` holds M_t of the previous
        layer) and the layer's balancing terms (empty unless `balancing()`)."""
        experts = self.experts[layer](x)
        e = self.num_experts
        features, written, gates, balance = {}, {}, {}, []
        for t in tasks:
            g = self.gate_weights(layer, t, x, memory.get(t))
            if self.balancing():
                balance.append(self.balance_loss(layer, t, x, memory.get(t)))
            f = (g[:, :e].unsqueeze(2) * experts).sum(1)  # faster than einsum on CPU
            if layer:
                f = f + g[:, e:] * memory[t]
            features[t], gates[t] = f, g
            update = self.writes[layer][t](f)
            written[t] = update if layer == 0 else memory[t] + update
        return features, written, gates, balance

    def memorial_pass(self, feats: Sequence[Tensor], grid: Sequence[int], tasks: Sequence[str]) -> MemorialPass:
        """Every memorial MoE layer on the backbone features `feats`, brought to `grid`."""
        memory: dict[str, Tensor] = {}
        features, gates, balance = [], [], []
        for layer, feat in enumerate(feats):
            f, memory, g, b = self.assemble(layer, to_grid(feat, grid), memory, tasks)
            features.append(f)
            gates.append(g)
            balance += b
        return MemorialPass(features, gates, memory, balance)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = tuple(images.shape[-2:])
        padded = pad_to_multiple(images, self.size_divisor)
        psize = tuple(padded.shape[-2:])
        feats = graph_boundary(self.backbone(padded))
        grid = (psize[0] // self.feature_stride, psize[1] // self.feature_stride)
        run = self.memorial_pass(feats, grid, tasks)
        head_grid = (psize[0] // self.output_stride, psize[1] // self.output_stride)
        out = {t: crop_to(self.heads[t](resize_to(run.memory[t], head_grid)), psize, size) for t in tasks}
        regularizers = {MOE_BALANCE: torch.stack(run.balance).sum()} if run.balance else {}
        stats = {
            f"experts/layer{layer}/{t}": g.detach().float().mean(dim=(2, 3)).sum(0)
            for layer, per_task in enumerate(run.gates)
            for t, g in per_task.items()
        }
        return model_output(out, regularizers=regularizers, shared=feats, stats=stats)

    # ------------------------------------------------------------------ contract
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for layer in range(self.num_layers):
            yield from self.gates[layer][task].parameters()
            yield from self.writes[layer][task].parameters()
        yield from self.heads[task].parameters()
