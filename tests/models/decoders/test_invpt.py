"""InvPT: the release's computation (joint attention scaled by the stage width, one read-out
LayerNorm over all tasks, ViT skips from blocks depth/2 and depth/4, 2-channel saliency), message
passing, padding and the decoder contract.  Parity with the authors' code at the release's shapes:
tests/convert/test_invpt.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.invpt import (
    CrossTaskAttentionDecoder,
    DecoderStrideError,
    JointTaskAttention,
    resize_scores,
)
from mtvision.tasks import get_task, resolve_tasks

TASKS3 = ("semseg", "depth", "normals")
SMALL = dict(task_channels=12, prediction_channels=4)
RESNET = {"name": "test_resnet"}
VIT = {"name": "vit_tiny_patch16_224", "out_indices": [0, 1, 2, 3], "output_norm": "last",
       "kwargs": {"img_size": 64, "dynamic_img_size": True, "depth": 4}}


def _model(backbone=RESNET, tasks=TASKS3, decoder="invpt", num_classes=5, **options):
    spec = {t: (num_classes if t == "semseg" else None) for t in tasks}
    opts = {**SMALL, **options} if decoder == "invpt" else options
    return create_model(backbone=backbone, decoder=decoder, tasks=spec, decoder_options=opts)


@pytest.mark.parametrize("backbone", [RESNET, VIT], ids=["resnet", "vit"])
def test_any_size_outputs_and_aux_only_in_training(backbone):
    torch.manual_seed(0)
    model = _model(backbone)
    assert isinstance(model.decoder, CrossTaskAttentionDecoder)
    assert model.decoder.size_divisor == 64  # every stage's query grid is half the next one's
    output = model(torch.randn(2, 3, 70, 90))  # padded to 128 x 128 and cropped back
    out, deep = output.predictions, output.deep_supervision
    assert {t: tuple(out[t].shape) for t in TASKS3} == {"semseg": (2, 5, 70, 90), "depth": (2, 1, 70, 90), "normals": (2, 3, 70, 90)}
    assert set(deep) == set(TASKS3) and deep["depth"][0].shape[-2:] == (70, 90)
    sum(o.square().mean() for o in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).deep_supervision == {}


def test_vit_skips_come_from_blocks_half_and_quarter_deep():
    torch.manual_seed(0)
    model = _model(VIT).eval()
    dec = model.decoder
    assert set(dec.backbone.strides) == {16} and dec.stage_strides == [32, 16, 8] and dec.output_stride == 4
    # four levels after blocks 1..4: stage 1 <- block 2 (3x3 conv), stage 2 <- block 1 (transposed conv)
    assert dec.input_level == 3 and dec.skip_levels == [None, 1, 0]
    up = dec.skip_proj[2]
    assert isinstance(up, nn.ConvTranspose2d) and (up.kernel_size, up.stride, up.padding, up.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))
    assert isinstance(dec.skip_proj[1], nn.Conv2d) and dec.skip_proj[1].kernel_size == (3, 3)
    x = torch.randn(1, 3, 64, 64)

    def moved_by_noise_on(level):
        handle = dec.backbone.register_forward_hook(
            lambda m, i, o: [f + torch.randn_like(f) if j == level else f for j, f in enumerate(o)])
        with torch.no_grad():
            out = model(x).predictions["depth"]
        handle.remove()
        return (out - base).abs().max().item()

    with torch.no_grad():
        base = model(x).predictions["depth"]
    assert moved_by_noise_on(2) == 0  # the level after block 3 is not used, as in the release
    assert all(moved_by_noise_on(level) > 1e-4 for level in (0, 1, 3))


def test_cnn_stages_take_the_level_of_the_matching_stride():
    cnn = _model(RESNET).decoder
    assert [cnn.backbone.strides[i] for i in cnn.skip_levels[1:]] == [16, 8]
    assert all(type(cnn.skip_proj[k]) is nn.Conv2d for k in (1, 2))


def _identity_query(attn: JointTaskAttention, task: str) -> None:
    conv, bn = attn.conv_q[task].op
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 1, 1] = 1.0
        bn.running_var.fill_(1.0 - bn.eps)  # BN is the identity in eval mode


def test_attention_scores_are_scaled_by_the_stage_width_not_the_head_width():
    torch.manual_seed(0)
    dim, heads = 8, 2
    attn = JointTaskAttention(["a"], dim, heads, q_stride=1, kv_stride=1).eval()
    _identity_query(attn, "a")
    x = torch.randn(1, dim, 2, 3)
    tokens = x.flatten(2).transpose(1, 2)  # 6 tokens
    q = attn.proj_q(tokens).reshape(6, heads, dim // heads).transpose(0, 1)
    k = attn.proj_k(tokens).reshape(6, heads, dim // heads).transpose(0, 1)
    expected = (q @ k.transpose(1, 2) / math.sqrt(dim)).softmax(-1)
    with torch.no_grad():
        got = attn.attention_map({"a": x})
    assert torch.allclose(got[0], expected, atol=1e-6)
    assert not torch.allclose(got[0], (q @ k.transpose(1, 2) / math.sqrt(dim // heads)).softmax(-1), atol=1e-3)


def test_read_out_layer_norm_spans_all_tasks():
    torch.manual_seed(0)
    dec = _model().decoder
    norm = dec.readout_norm[1]
    assert norm.normalized_shape == (3 * dec.dims[1],)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    maps = {t: torch.randn(1, dec.dims[1], 2, 3) for t in TASKS3}
    got = dec._readout(1, maps)
    joint = torch.cat([maps[t] for t in TASKS3], 1).permute(0, 2, 3, 1)
    want = F.layer_norm(joint, norm.normalized_shape, norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    assert torch.allclose(torch.cat([got[t] for t in TASKS3], 1), want, atol=1e-5)
    moved = dec._readout(1, {**maps, "semseg": 10 * maps["semseg"]})
    assert (moved["depth"] - got["depth"]).abs().max() > 1e-3  # one task's scale moves another's read-out


def test_joint_attention_mixes_tasks_unlike_hps():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    invpt = _model()
    effect = _perturbation_effect(invpt, invpt.decoder.preliminary["semseg"], x)
    assert effect["depth"] > 1e-4 and effect["normals"] > 1e-4
    hps = _model(decoder="hps", neck_channels=16, head_channels=8)
    effect = _perturbation_effect(hps, hps.decoder.heads["semseg"].body, x)
    assert effect["semseg"] > 1e-4 and effect["depth"] == 0 and effect["normals"] == 0


def _perturbation_effect(model, hook_module, x):
    model.eval()
    with torch.no_grad():
        base = model(x).predictions
        handle = hook_module.register_forward_hook(lambda m, i, o: o + torch.randn_like(o))
        moved = model(x).predictions
        handle.remove()
    return {t: (moved[t] - base[t]).abs().max().item() for t in base}


def test_permuting_task_order_permutes_outputs():
    torch.manual_seed(0)
    a = _model(tasks=("semseg", "depth", "normals")).eval()
    b = _model(tasks=("normals", "semseg", "depth")).eval()
    state_a = a.state_dict()
    state_b = dict(state_a)
    order = [("semseg", "depth", "normals").index(t) for t in ("normals", "semseg", "depth")]
    for k, d in enumerate(a.decoder.dims):  # the joint LayerNorm's task blocks follow the task order
        for leaf in ("weight", "bias"):
            key = f"decoder.readout_norm.{k}.{leaf}"
            state_a[key] = torch.randn_like(state_a[key])
            state_b[key] = torch.cat([state_a[key][i * d : (i + 1) * d] for i in order])
    a.load_state_dict(state_a)
    b.load_state_dict(state_b)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        oa, ob = a(x).predictions, b(x).predictions
    assert list(ob) == ["normals", "semseg", "depth"]
    for t in TASKS3:
        assert torch.allclose(oa[t], ob[t], atol=1e-5), t


def test_attention_rows_sum_to_one_and_pooled_kv_shrinks_keys():
    torch.manual_seed(0)
    model = _model().eval()
    dec = model.decoder
    for k, blk in enumerate(dec.blocks):
        h, w = 128 // dec.stage_strides[k], 192 // dec.stage_strides[k]
        maps = {t: torch.randn(1, dec.dims[k], h, w) for t in TASKS3}
        with torch.no_grad():
            attn = blk.attn.attention_map(blk.normed(maps))
        s = (2, 4, 8)[k]
        assert attn.shape == (1, 2, 3 * (-(-h // 2)) * (-(-w // 2)), 3 * (-(-h // s)) * (-(-w // s)))
        assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5)
    # kv stride 1 keeps every position as a key
    full = JointTaskAttention(["a", "b"], 8, 2, q_stride=1, kv_stride=1).eval()
    assert full.attention_map({"a": torch.randn(1, 8, 4, 6), "b": torch.randn(1, 8, 4, 6)}).shape == (1, 2, 48, 48)


def test_average_pooled_keys_are_window_means():
    attn = JointTaskAttention(["a"], 4, 2, q_stride=2, kv_stride=2).eval()
    x = torch.arange(2 * 4 * 3 * 4, dtype=torch.float32).reshape(2, 4, 3, 4)
    pooled = attn.conv_k["a"](x)  # ceil mode: the last row window holds one row
    assert pooled.shape == (2, 4, 2, 2)
    assert torch.allclose(pooled[..., 0, 0], x[..., :2, :2].mean((-1, -2)))
    assert torch.allclose(pooled[..., 1, 1], x[..., 2:, 2:].mean((-1, -2)))


def test_single_task_attends_only_to_itself():
    torch.manual_seed(0)
    model = _model(tasks=("depth",)).eval()
    blk = model.decoder.blocks[0]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64)).predictions
        attn = blk.attn.attention_map({"depth": torch.randn(1, model.decoder.dims[0], 2, 2)})
    assert list(out) == ["depth"] and out["depth"].shape == (1, 1, 64, 64)
    assert attn.shape[-1] == 1  # one task, 2x2 grid, kv stride 2 -> 1 key


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
    assert sorted(128 // r.shape[-1] for r in reps) == sorted({strides[-1], 16, 8})  # 64 x 80 padded to 64 x 128
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
    assert {id(p) for p in model.decoder.readout_norm.parameters()} <= shared  # spans all tasks
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
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        model.decoder.blocks[0].attn.proj_q.weight.mul_(30.0)  # scores far from uniform at stage 0
        before = model(x).predictions["depth"]
        fuse.weight[:, fuse.weight.shape[1] // 2 :].add_(1.0)  # the message half
        after = model(x).predictions["depth"]
    assert (before - after).abs().max() > 1e-5
    # the message is the previous stage's fused scores, upsampled x2 over each task's query grid
    blk = model.decoder.blocks[1]
    maps = {t: torch.randn(1, model.decoder.dims[1], 4, 6) for t in TASKS3}
    prev = torch.randn(1, 2, 3 * 1 * 2, 3 * 1 * 2)  # queries of a 1 x 2 grid, keys of a 1 x 2 grid, per task
    with torch.no_grad():
        alone = blk.attn.attention_map(maps, {})
        message = {"scores": prev, "q": (1, 2), "k": (1, 2)}
        passed = blk.attn.attention_map(maps, message)
    assert message["scores"].shape == (1, 2, 3 * 2 * 3, 3 * 2) and (alone - passed).abs().max() > 1e-3
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


def test_release_defaults_and_the_dwconv_option():
    dec = _model().decoder
    assert all(type(b.attn.conv_k["depth"].op) is nn.AvgPool2d for b in dec.blocks)
    assert all(isinstance(b.drop_path, nn.Identity) for b in dec.blocks)  # the release's effective rate is 0
    assert dec.final["depth"][0].bias is not None  # the final 3x3 conv has a bias
    model = _model(kv_proj="dwconv")
    assert isinstance(model.decoder.blocks[0].attn.conv_k["depth"].op, nn.Sequential)
    assert model(torch.randn(2, 3, 64, 64)).predictions["depth"].shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="unknown projection"):
        _model(kv_proj="max")
    with pytest.raises(ValueError, match="saliency_channels must be 1 or 2"):
        _model(tasks=("saliency",), saliency_channels=3)


def test_two_channel_saliency_is_re_embedded_and_trains_with_the_balanced_loss():
    torch.manual_seed(0)
    model = _model(tasks=("semseg", "saliency"))
    dec = model.decoder
    assert dec.aux_heads["saliency"].out_channels == 2 and dec.heads["saliency"].out_channels == 2
    assert dec.embed["saliency"].in_channels == SMALL["task_channels"] + 2  # the 2-class prediction is re-embedded
    out = model(torch.randn(2, 3, 64, 64))
    assert out.predictions["saliency"].shape == (2, 2, 64, 64) and out.deep_supervision["saliency"][0].shape[1] == 2
    assert _model(tasks=("saliency",), saliency_channels=1).decoder.heads["saliency"].out_channels == 1
    # the loss: 2-class cross-entropy, salient pixels weighted by the background share and vice versa
    task = get_task("saliency")
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5], [3.0, 0.0]]).T.reshape(1, 2, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-2.0)), math.log(2.0), math.log(1 + math.exp(-3.0))]
    want = (0.75 * ce[0] + 0.25 * (ce[1] + ce[2] + ce[3])) / 4
    assert task.loss(logits, target).item() == pytest.approx(want, rel=1e-6)
    probs = task.decode(logits)
    assert probs.shape == (1, 1, 2, 2) and torch.allclose(probs, torch.sigmoid(logits[:, 1:] - logits[:, :1]))
    one = torch.tensor([0.3, -1.0, 2.0, 0.0]).reshape(1, 1, 2, 2)  # one logit: plain BCE and a sigmoid, as before
    assert task.loss(one, target).item() == pytest.approx(F.binary_cross_entropy_with_logits(one, target).item())
    assert torch.equal(task.decode(one), torch.sigmoid(one))


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
