"""M3ViT: a task-routed mixture-of-experts ViT backbone with a per-task neck and head."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtvision.models.decoders.base import MOE_BALANCE, BackboneFactory, ModelOutput, MultiTaskDecoder, model_output
from mtvision.models.decoders.invpt import crop_to, pad_to_multiple
from mtvision.models.heads import MultiScaleNeck, TaskHead
from mtvision.models.m3vit_backbone import M3VIT_EVERY, M3VIT_NUM_EXPERTS, M3VIT_TOP_K, M3ViTBackbone
from mtvision.tasks import Task


class M3ViTDecoder(MultiTaskDecoder):
    """M3ViT (Liang et al., NeurIPS 2022) for dense prediction.

    The backbone (a plain timm ViT) gets a task-routed MoE in every other block (`M3ViTBackbone`);
    each task has its own FPN-style neck over the backbone's feature indices (stride-16 token maps)
    and its own head.  `forward(images, [t])` runs the shared blocks, task t's expert pathway, its
    neck and head only.

    In training the output carries the regularizer `MOE_BALANCE`: the sum of every MoE layer's
    balancing loss w·(cv²(importance) + cv²(load)) for this forward (already weighted by
    `balance_weight`), a scalar added to the total loss once (it is not a task).  Statistics:
    `experts/blocks.<i>/<task>`, the (token, expert) assignments per expert of each MoE block, and
    `experts/blocks.<i>/<task>/dropped`, the assignments dropped by capacity.

    Shared representation: the token state entering the first MoE block (where the pathways branch).

    Options:
        num_experts, top_k, every: MoE layout (M3ViT: 16 experts, top-4, every other block).
        expert_mlp_ratio: experts' hidden width / token width; None: the dense MLP's width (experts
            start as copies of the dense MLP; see `moeify_vit`).  M3ViT's released runs use 1.0.
        expert_init: "auto", "copy" or "random" (see `moeify_vit`).
        routing: "per_task" (a gate per task) or "task_embedding" (shared gate, task embedding input).
        capacity_factor: expert capacity factor (None: no token is dropped).
        balance_weight: weight of the balancing loss (1e-2).
        noisy_gating: noisy top-k gating in training.
        init_noise_std: relative noise added to experts copied from the dense MLP.
        neck_channels, head_channels, norm: the per-task neck and heads (as in HPS).
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
        noisy_gating: bool = True,
        init_noise_std: float = 0.01,
        neck_channels: int = 128,
        head_channels: int = 64,
        norm: str = "bn",
    ):
        super().__init__(tasks)
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
            noisy_gating=noisy_gating,
        )
        chans, strides = self.backbone.channels, self.backbone.strides
        self.necks = nn.ModuleDict({n: MultiScaleNeck(chans, strides, neck_channels, norm=norm) for n in tasks})
        self.heads = nn.ModuleDict(
            {n: TaskHead(neck_channels, t.out_channels, head_channels, norm=norm) for n, t in tasks.items()}
        )
        self.output_stride = min(strides)

    def forward(self, images: Tensor, tasks: Sequence[str]) -> ModelOutput:
        size = images.shape[-2:]
        padded = pad_to_multiple(images, self.backbone.strides[0])  # any input size: pad, then crop back
        run = self.backbone(padded, tasks)
        out = {t: crop_to(self.heads[t](self.necks[t](run.features[t])), padded.shape[-2:], size) for t in tasks}
        regularizers = {MOE_BALANCE: run.balance_loss} if self.training and run.balance_loss is not None else {}
        stats: dict[str, Tensor] = {}
        for i, s in run.stats.items():
            for row, load in s.usage.items():
                stats[f"experts/blocks.{i}/{row}"] = load.float()
                stats[f"experts/blocks.{i}/{row}/dropped"] = s.dropped_by_row[row].float()
        return model_output(out, regularizers=regularizers, shared=[run.shared], stats=stats)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.necks[task].parameters()
        yield from self.heads[task].parameters()
        yield from self.backbone.task_gate_parameters(task)
