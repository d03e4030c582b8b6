"""InvPT-style cross-task attention decoder: joint attention, message passing, padding, contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.invpt import (
    CrossTaskAttentionDecoder,
    DecoderStrideError,
    JointTaskAttention,
    resize_scores,
)
from mtvision.tasks import resolve_tasks

TASKS3 = ("semseg", "depth", "normals")
SMALL = dict(task_channels=12, prediction_channels=4, drop_path=0.0)
RESNET = {"name": "test_resnet"}
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "dynamic_img_size": True, "depth": 4}}


def _model(backbone=RESNET, tasks=TASKS3, decoder="invpt", num_classes=5, **options):
    spec = {t: (num_classes if t == "semseg" else None) for t in tasks}
    opts = {**SMALL, **options} if decoder == "invpt" else options
    return create_model(backbone=backbone, decoder=decoder, tasks=spec, decoder_options=opts)


@pytest.mark.parametrize("backbone", [RESNET, VIT], ids=["resnet", "vit"])
def test_any_size_outputs_and_aux_only_in_training(backbone):
    torch.manual_seed(0)
    model = _model(backbone)
    assert isinstance(model.decoder, CrossTaskAttentionDecoder)
    output = model(torch.randn(2, 3, 70, 90))  # not a multiple of 32: padded and cropped back
    out, deep = output.predictions, output.deep_supervision
    assert {t: tuple(out[t].shape) for t in TASKS3} == {"semseg": (2, 5, 70, 90), "depth": (2, 1, 70, 90), "normals": (2, 3, 70, 90)}
    assert set(deep) == set(TASKS3) and deep["depth"][0].shape[-2:] == (70, 90)
    sum(o.square().mean() for o in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).deep_supervision == {}


def test_vit_pyramid_is_built_by_upsampling():
    model = _model(VIT)
    dec = model.decoder
    assert set(dec.backbone.strides) == {16}
    assert dec.stage_strides == [32, 16, 8] and dec.output_stride == 4
    # deeper (finer) stages take shallower ViT layers, as in InvPT
    assert dec.skip_levels[1:] == [len(dec.backbone.strides) - 2, len(dec.backbone.strides) - 3]
    # CNN stages take the level of the matching stride
    cnn = _model(RESNET).decoder
    assert [cnn.backbone.strides[i] for i in cnn.skip_levels[1:]] == [16, 8]


def _perturbation_effect(model, hook_module, x):
    model.eval()
    with torch.no_grad():
        base = model(x).predictions
        handle = hook_module.register_forward_hook(lambda m, i, o: o + torch.randn_like(o))
        moved = model(x).predictions
        handle.remove()
    return {t: (moved[t] - base[t]).abs().max().item() for t in base}


def test_joint_attention_mixes_tasks_unlike_hps():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    invpt = _model()
    effect = _perturbation_effect(invpt, invpt.decoder.preliminary["semseg"], x)
    assert effect["depth"] > 1e-4 and effect["normals"] > 1e-4
    hps = _model(decoder="hps", neck_channels=16, head_channels=8)
    effect = _perturbation_effect(hps, hps.decoder.heads["semseg"].body, x)
    assert effect["semseg"] > 1e-4 and effect["depth"] == 0 and effect["normals"] == 0


def test_permuting_task_order_permutes_outputs():
    torch.manual_seed(0)
    a = _model(tasks=("semseg", "depth", "normals")).eval()
    b = _model(tasks=("normals", "semseg", "depth")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        oa, ob = a(x).predictions, b(x).predictions
    assert list(ob) == ["normals", "semseg", "depth"]
    for t in TASKS3:
        assert torch.allclose(oa[t], ob[t], atol=1e-5), t


def test_attention_rows_sum_to_one_and_strided_kv_shrinks_keys():
    torch.manual_seed(0)
    model = _model(kv_strides=(2, 4, 8)).eval()
    dec = model.decoder
    for blk in dec.blocks:
        blk.attn.keep_attention = True
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 192))
    t = len(TASKS3)
    for k, blk in enumerate(dec.blocks):
        attn = blk.attn.attention
        h, w = 128 // dec.stage_strides[k], 192 // dec.stage_strides[k]
        s = (2, 4, 8)[k]
        assert attn.shape == (1, 2, t * (-(-h // 2)) * (-(-w // 2)), t * (-(-h // s)) * (-(-w // s)))
        assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5)
    # kv stride 1 keeps every position as a key
    full = JointTaskAttention(["a", "b"], 8, 2, q_stride=1, kv_stride=1)
    full.keep_attention = True
    full.eval()({"a": torch.randn(1, 8, 4, 6), "b": torch.randn(1, 8, 4, 6)})
    assert full.attention.shape == (1, 2, 48, 48)


def test_single_task_attends_only_to_itself():
    torch.manual_seed(0)
    model = _model(tasks=("depth",)).eval()
    blk = model.decoder.blocks[0]
    blk.attn.keep_attention = True
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64)).predictions
    assert list(out) == ["depth"] and out["depth"].shape == (1, 1, 64, 64)
    assert blk.attn.attention.shape[-1] == 1 * 1 * 1  # one task, 2x2 grid, kv stride 2 -> 1 key


def test_subset_forward_matches_full_and_returns_only_requested():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x).predictions
        only = model(x, tasks=["normals"]).predictions
    assert list(only) == ["normals"]
    assert torch.allclose(only["normals"], full["normals"], atol=1e-5)
    model.train()
    out = model(x, tasks=["depth"])
    assert set(out.predictions) == {"depth"} and set(out.deep_supervision) == {"depth"}


def test_every_task_loss_reaches_the_shared_representation(synthetic_batch):
    torch.manual_seed(0)
    model = _model(tasks=TASKS3, num_classes=synthetic_batch["num_classes"])
    output = model(synthetic_batch["image"][:2])
    out, reps = output.predictions, output.shared
    assert reps and all(r.requires_grad for r in reps)
    strides = model.decoder.backbone.strides
    assert sorted(64 // r.shape[-2] for r in reps) == sorted({strides[-1], 16, 8})
    for t in TASKS3:
        loss = model.tasks[t].loss(out[t], synthetic_batch[t][:2])
        grads = torch.autograd.grad(loss, reps, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), t


def test_task_parameters_affect_only_their_task():
    torch.manual_seed(0)
    model = _model()
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS3}
    assert all(per_task.values()) and not per_task["semseg"] & per_task["depth"]
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.decoder.preliminary.parameters()} <= shared  # mixed into other tasks
    assert {id(p) for p in model.decoder.aux_heads.parameters()} <= shared  # predictions re-embedded
    out = model(torch.randn(2, 3, 64, 64)).predictions
    out["depth"].square().mean().backward()
    for t in ("semseg", "normals"):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters(t)), t
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.task_parameters("depth") if p.ndim > 1)


def test_message_passing_feeds_the_next_stage():
    torch.manual_seed(0)
    model = _model().eval()
    fuse = model.decoder.blocks[1].attn.fuse_message
    assert model.decoder.blocks[0].attn.fuse_message is None and fuse is not None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x).predictions["depth"]
        fuse.weight[:, fuse.weight.shape[1] // 2 :].add_(1.0)  # the message half
        after = model(x).predictions["depth"]
    assert (before - after).abs().max() > 1e-5
    plain = _model(message_passing=False)
    assert all(b.attn.fuse_message is None for b in plain.decoder.blocks)


def test_resize_scores_keeps_per_task_blocks():
    # two tasks, 2x2 queries each, 1x2 keys each; a constant per (query task, key task) block
    block = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    scores = block.repeat_interleave(4, 0).repeat_interleave(2, 1)[None, None]
    out = resize_scores(scores, 2, (2, 2), (4, 4), (1, 2), (2, 2))
    assert out.shape == (1, 1, 32, 8)
    expected = block.repeat_interleave(16, 0).repeat_interleave(4, 1)
    assert torch.allclose(out[0, 0], expected)


def test_avg_kv_projection_option_and_bad_option():
    model = _model(kv_proj="avg")
    assert model(torch.randn(2, 3, 64, 64)).predictions["depth"].shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="unknown projection"):
        _model(kv_proj="max")


class _FakeBackbone(nn.Module):
    def __init__(self, strides):
        super().__init__()
        self.strides, self.channels = list(strides), [8] * len(strides)

    def forward(self, x):
        return [torch.zeros(x.shape[0], 8, x.shape[-2] // s, x.shape[-1] // s) for s in self.strides]


@pytest.mark.parametrize("strides", [[14, 14], [8, 4], [4, 8, 16, 32, 64]])
def test_unfit_strides_raise_a_clear_error(strides):
    tasks = resolve_tasks(["depth", "normals"], {})
    with pytest.raises(DecoderStrideError) as info:
        CrossTaskAttentionDecoder(lambda: _FakeBackbone(strides), tasks)
    assert isinstance(info.value, MTVisionError) and "stride" in str(info.value)


def test_learns_on_synthetic_scenes(synthetic_batch):
    torch.manual_seed(0)
    model = _model(tasks=("semseg", "depth"), num_classes=synthetic_batch["num_classes"])
    images = synthetic_batch["image"][:4]

    def loss_of(out):
        total = sum(model.tasks[t].loss(out.predictions[t], synthetic_batch[t][:4]) for t in ("semseg", "depth"))
        return total + sum(model.tasks[t].loss(a, synthetic_batch[t][:4]) for t, deep in out.deep_supervision.items() for a in deep)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(6):
        opt.zero_grad()
        loss = loss_of(model(images))
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.95, (first, loss.item())
