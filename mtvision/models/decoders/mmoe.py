"""MMoE / MMoEEx: shared convolutional experts mixed per task by softmax gates."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import unknown_name
from mtvision.models.decoders.base import (
    MMOE_DIVERSITY,
    BackboneFactory,
    ModelOutput,
    MultiTaskDecoder,
    graph_boundary,
    model_output,
)
from mtvision.models.heads import ConvBNReLU, MultiScaleNeck, TaskHead
from mtvision.models.moe import MoEError

GATES = ("pixel", "global")
EXCLUSIVITY_MODES = ("exclusivity", "exclusion")


def exclusivity_mask(
    num_tasks: int, num_experts: int, alpha: float, mode: str = "exclusivity", seed: int = 0
) -> Tensor:
    """T x E boolean mask of the experts each task's gate may use (MMoEEx, Aoki et al. 2021).

    The first int(alpha · E) experts are special (the rest stay shared by all tasks): in
    "exclusivity" mode each is reserved to one task, in "exclusion" mode each is removed from one
    task.  The task of each special expert is drawn with `seed`, as a shuffled round robin, so no
    task is left without an expert when alpha = 1 and E >= T.
    """
    if not 0.0 <= alpha <= 1.0:
        raise MoEError(f"exclusivity must lie in [0, 1], got {alpha}")
    if mode not in EXCLUSIVITY_MODES:
        raise unknown_name("MMoEEx exclusivity mode", mode, EXCLUSIVITY_MODES)
    mask = torch.ones(num_tasks, num_experts, dtype=torch.bool)
    special = int(alpha * num_experts)
    if special == 0:
        return mask
    g = torch.Generator().manual_seed(seed)
    rounds = -(-special // num_tasks)
    owners = torch.cat([torch.randperm(num_tasks, generator=g) for _ in range(rounds)])[:special]
    for e, t in enumerate(owners.tolist()):
        if mode == "exclusivity":
            mask[:, e] = False
            mask[t, e] = True
        else:
            mask[t, e] = False
    starved = [t for t in range(num_tasks) if not mask[t].any()]
    if starved:
        raise MoEError(f"exclusivity={alpha} leaves task(s) {starved} without any expert; lower it or add experts")
    return mask


class MMoEDecoder(MultiTaskDecoder):
    """Multi-gate mixture-of-experts (Ma et al., KDD 2018) adapted to dense prediction, with the
    exclusivity/exclusion of MMoEEx (Aoki et al. 2021).

    A shared backbone + FPN neck (as HPS) gives the map z; E experts (3x3 conv-BN-ReLU blocks, run
    as one convolution with E x expert_channels outputs, which is the same function) transform it;
    each task t mixes them as f_t = Σ_e g_t,e · expert_e(z) with its own softmax gate and feeds f_t
    to its head.  Gates: "pixel" (default: a 1x1 convolution gives per-pixel expert weights, the
    dense analogue of MMoE's per-example gate that lets a pixel of a wall and of a chair use
    different experts) or "global" (MMoE's gate on the globally pooled z, one mixture per image).

    MMoEEx: `exclusivity` = α ∈ [0, 1]: int(α·E) experts are reserved to one task each
    (`exclusivity_mode="exclusivity"`) or removed from one task each ("exclusion"), by masking the
    other tasks' gate logits to -inf.  `diversity_weight` > 0 adds the regularizer `MMOE_DIVERSITY` in training: the weight
    times the mean pairwise cosine similarity of the experts' outputs (lower when experts differ).
    `expert_diversity(experts)` gives MMoEEx's diversity measure: the pairwise distance matrix of
    expert outputs, normalised to [0, 1].  Statistics: `experts/<task>`, each task's gate mass per
    expert (summed over images, mean over pixels).

    Shared representation: the neck map z.  Task parameters: the task's gate and head.
    """

    def __init__(
        self,
        make_backbone: BackboneFactory,
        tasks: dict,
        num_experts: int = 8,
        expert_channels: int | None = None,
        gate: str = "pixel",
        exclusivity: float = 0.0,
        exclusivity_mode: str = "exclusivity",
        exclusivity_seed: int = 0,
        diversity_weight: float = 0.0,
        neck_channels: int = 128,
        head_channels: int = 64,
        norm: str = "bn",
    ):
        super().__init__(tasks)
        if num_experts < 1:
            raise MoEError(f"num_experts must be >= 1, got {num_experts}")
        if gate not in GATES:
            raise unknown_name("MMoE gate", gate, GATES)
        self.num_experts, self.gate_kind, self.diversity_weight = num_experts, gate, diversity_weight
        self.expert_channels = expert_channels or neck_channels
        self.backbone = make_backbone()
        self.neck = MultiScaleNeck(self.backbone.channels, self.backbone.strides, neck_channels, norm=norm)
        self.experts = ConvBNReLU(neck_channels, num_experts * self.expert_channels, norm=norm)
        make_gate = (
            (lambda: nn.Conv2d(neck_channels, num_experts, 1))
            if gate == "pixel"
            else (lambda: nn.Linear(neck_channels, num_experts))
        )
        self.gates = nn.ModuleDict({n: make_gate() for n in tasks})
        self.heads = nn.ModuleDict(
            {n: TaskHead(self.expert_channels, t.out_channels, head_channels, norm=norm) for n, t in tasks.items()}
        )
        mask = exclusivity_mask(len(tasks), num_experts, exclusivity, exclusivity_mode, exclusivity_seed)
        self.register_buffer("allowed", mask)
        self.output_stride = self.neck.stride

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def gate_weights(self, shared: Tensor, task: str) -> Tensor:
        """Task `task`'s softmax expert weights on the neck map: N x E x H x W (pixel) or N x E x 1 x 1."""
        if self.gate_kind == "pixel":
            logits = self.gates[task](shared)
        else:
            logits = self.gates[task](shared.mean(dim=(2, 3)))[:, :, None, None]
        allowed = self.allowed[self.task_names.index(task)].view(1, -1, 1, 1)
        return torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=1).to(shared.dtype)

    def expert_outputs(self, shared: Tensor) -> Tensor:
        """The experts on the neck map: N x E x expert_channels x H x W."""
        n, _, h, w = shared.shape
        return self.experts(shared).view(n, self.num_experts, self.expert_channels, h, w)

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        (shared,) = graph_boundary([self.neck(self.backbone(images))])
        h, w = shared.shape[-2:]
        experts = self.expert_outputs(shared)
        out: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for t in tasks:
            g = self.gate_weights(shared, t)
            mixed = torch.einsum("nehw,nechw->nchw", g.expand(-1, -1, h, w), experts)
            out[t] = self.heads[t](mixed)
            stats[f"experts/{t}"] = g.detach().float().mean(dim=(2, 3)).sum(0)
        regularizers = {}
        if self.training and self.diversity_weight > 0 and self.num_experts > 1:
            regularizers[MMOE_DIVERSITY] = self.diversity_weight * mean_pairwise_cosine(experts)
        return model_output(out, regularizers=regularizers, shared=[shared], stats=stats)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.gates[task].parameters()
        yield from self.heads[task].parameters()


def expert_diversity(experts: Tensor) -> Tensor:
    """MMoEEx's diversity matrix of expert outputs (N x E x C x H x W): E x E distances between them
    (root mean squared difference over the batch), divided by the largest; its mean is the
    diversity score."""
    num_experts = experts.shape[1]
    flat = experts.detach().float().transpose(0, 1).reshape(num_experts, -1)
    dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    top = dist.max()
    return dist / top if top > 0 else dist


def mean_pairwise_cosine(experts: Tensor) -> Tensor:
    """Mean over expert pairs e != f of the cosine similarity of their outputs (per image, averaged);
    `experts` is N x E x C x H x W."""
    flat = F.normalize(experts.flatten(2).float(), dim=2)  # N x E x CHW
    sim = flat @ flat.transpose(1, 2)  # N x E x E
    e = sim.shape[1]
    off_diagonal = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)
    return (off_diagonal / (e * (e - 1))).mean()
