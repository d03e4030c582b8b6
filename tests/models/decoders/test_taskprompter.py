"""TaskPrompter: prompts carried through the ViT's own blocks, the release's prompt update,
spatial/channel task features, cross-task reweighting, the final norm, heads and the contract.
Parity with the authors' code at the release's shapes: tests/convert/test_taskprompter.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.taskprompter import TaskPrompterDecoder, TaskPromptError

TASKS3 = ("semseg", "depth", "normals")
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "dynamic_img_size": True, "depth": 4}}
SMALL = dict(feature_channels=12, embed_channels=12, channel_heads=4)


def _model(tasks=TASKS3, backbone=VIT, **options):
    spec = {t: (5 if t == "semseg" else None) for t in tasks}
    return create_model(backbone=backbone, decoder="taskprompter", tasks=spec, decoder_options={**SMALL, **options})


def test_outputs_any_size_and_every_used_parameter_learns():
    torch.manual_seed(0)
    model = _model()
    dec = model.decoder
    assert isinstance(dec, TaskPrompterDecoder)
    assert dec.prompter.layers == [1, 2, 3, 4] and dec.prompter.prompts.shape == (3, 192)
    out = model(torch.randn(2, 3, 70, 90)).predictions  # padded to 80 x 96, cropped back
    assert {t: tuple(o.shape) for t, o in out.items()} == {"semseg": (2, 5, 70, 90), "depth": (2, 1, 70, 90), "normals": (2, 3, 70, 90)}
    sum(o.square().mean() for o in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert not dec.prompter.vit.cls_token.requires_grad  # replaced by the prompts
    assert len(dec.prompter.to_channel) == 4 and len(dec.prompter.from_channel) == 3  # the last update reaches nothing


def test_block_walk_reproduces_the_vit_without_prompts():
    torch.manual_seed(0)
    prompter = _model().decoder.prompter.eval()
    x, grid = prompter._embed(torch.randn(1, 3, 64, 64))
    empty = x.new_zeros(1, 0, x.shape[-1])
    for i, blk in enumerate(prompter.vit.blocks[:3]):
        ours, *_ = prompter._layer(i, x, empty, grid)
        assert torch.allclose(ours, blk(x), atol=1e-5), i
        x = ours


def test_prompts_are_updated_with_the_channel_prompts_themselves():
    torch.manual_seed(0)
    prompter = _model().decoder.prompter.eval()
    x, grid = prompter._embed(torch.randn(1, 3, 64, 64))
    p = prompter.prompts[None]
    blk = prompter.vit.blocks[0]
    with torch.no_grad():
        _, p_new, raw, chan = prompter._layer(0, x, p, grid)
        pn, xn = blk.norm1(p), blk.norm1(x)
        attended = blk.attn(torch.cat([pn, xn], 1))[:, : p.shape[1]]  # timm's own attention on [prompts; patches]
        channel_prompts = prompter.to_channel[0](pn)  # B x T x N
        want = p + attended + prompter.from_channel[0](channel_prompts)
        want = want + blk.mlp(blk.norm2(want))
        assert torch.allclose(p_new, want, atol=1e-5)
        # raw channel logits: each window's channel prompt against the channels of the normed patches
        xm = xn.transpose(1, 2).reshape(1, -1, *grid)
        window = channel_prompts.reshape(1, 3, *grid)[:, :, 2:, :2].flatten(2) @ xm[:, :, 2:, :2].flatten(2).transpose(1, 2)
        assert torch.allclose(chan[..., 1, 0], window, atol=1e-4)
        # raw spatial logits: unscaled q.k of the prompt rows
        q, k, _ = blk.attn.qkv(torch.cat([pn, xn], 1)).reshape(1, -1, 3, 3, 64).permute(2, 0, 3, 1, 4)
        assert torch.allclose(raw, (q @ k.transpose(-2, -1))[:, :, :3], atol=1e-4)


def test_prompts_carry_task_interaction():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = model(x).predictions
        model.decoder.prompter.prompts[0].add_(torch.randn(192))  # the semseg prompt
        moved = model(x).predictions
    # prompts attend to each other and to the patches, so every task sees the change
    assert all((moved[t] - base[t]).abs().max() > 1e-5 for t in TASKS3)


def test_cross_task_reweighting_sums_all_tasks_features_with_unnormalised_weights():
    torch.manual_seed(0)
    plain = _model().eval()
    ctr = _model(cross_task_reweighting=True).eval()
    assert ctr.load_state_dict(plain.state_dict(), strict=False).unexpected_keys == []
    c = 0.7
    with torch.no_grad():
        for level in ctr.decoder.prompter.ctr:
            for seq in level.values():
                assert seq[0].in_channels == 3 and seq[2].out_channels == 1  # heads -> heads -> 1
                seq[2].weight.zero_()
                seq[2].bias.fill_(c)  # every weight c: no softmax, no normalisation
        x = torch.randn(1, 3, 64, 64)
        base = plain.decoder.prompter(x)
        mixed = ctr.decoder.prompter(x)
    total = sum(base.values())
    assert all(torch.allclose(mixed[t], c * total, atol=1e-4) for t in TASKS3)
    only = ctr.decoder.prompter(x, ["depth"])
    assert list(only) == ["depth"] and torch.allclose(only["depth"], mixed["depth"], atol=1e-5)


def test_last_read_out_uses_the_backbones_final_norm_and_heads_are_conv_bias_bn_gelu():
    torch.manual_seed(0)
    normed = _model(backbone={**VIT, "output_norm": "last"}).eval()
    plain = _model().eval()
    final = normed.decoder.prompter.final_norm
    assert isinstance(final, nn.LayerNorm) and final.eps == 1e-6 and isinstance(plain.decoder.prompter.final_norm, nn.Identity)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = normed(x).predictions["depth"]
        final.bias.add_(0.5)
        assert (normed(x).predictions["depth"] - before).abs().max() > 1e-4
    head = normed.decoder.heads["depth"]
    assert head.body[0].bias is not None and isinstance(head.body[1], nn.BatchNorm2d) and isinstance(head.body[2], nn.GELU)
    with pytest.raises(TaskPromptError, match="only the last read-out"):
        _model(backbone={**VIT, "output_norm": "all"})


def test_each_task_loss_reaches_its_own_prompt_and_the_shared_blocks():
    torch.manual_seed(0)
    model = _model()
    out = model(torch.randn(2, 3, 64, 64)).predictions
    prompts = model.decoder.prompter.prompts
    qkv = model.decoder.prompter.vit.blocks[0].attn.qkv.weight
    for i, t in enumerate(TASKS3):
        g_prompt, g_qkv = torch.autograd.grad(out[t].square().mean(), [prompts, qkv], retain_graph=True)
        assert g_prompt[i].abs().sum() > 0 and g_qkv.abs().sum() > 0, t


@pytest.mark.parametrize("ctr", [False, True], ids=["plain", "ctr"])
def test_subset_forward_matches_full_and_task_parameters_are_isolated(ctr):
    torch.manual_seed(0)
    model = _model(cross_task_reweighting=ctr).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, only = model(x).predictions, model(x, tasks=["depth"]).predictions
    assert list(only) == ["depth"] and torch.allclose(only["depth"], full["depth"], atol=1e-5)
    model.train()
    output = model(x)
    output.predictions["normals"].square().mean().backward()
    for t in ("semseg", "depth"):
        assert all(p.grad is None for p in model.task_parameters(t)), t
    assert all(p.grad is not None for p in model.task_parameters("normals"))
    assert output.shared == []
    shared = {id(p) for p in model.shared_parameters()}
    assert id(model.decoder.prompter.prompts) in shared
    fuse = {id(p) for p in model.decoder.prompter.fuse[0]["semseg"].parameters()}
    assert (fuse <= shared) == ctr  # reweighting mixes every task's read-outs into each task


def test_single_task_prompt_length_and_saliency_channels():
    model = _model(tasks=("depth",), prompt_len=2)
    assert model.decoder.prompter.prompts.shape == (2, 192)
    assert model(torch.randn(2, 3, 48, 64)).predictions["depth"].shape == (2, 1, 48, 64)
    assert _model(tasks=("saliency",)).decoder.heads["saliency"].out.out_channels == 2
    assert _model(tasks=("saliency",), saliency_channels=1).decoder.heads["saliency"].out.out_channels == 1


def test_refuses_non_vit_backbones_and_bad_options():
    with pytest.raises(TaskPromptError) as info:
        _model(backbone={"name": "test_resnet"})
    assert isinstance(info.value, MTVisionError)
    with pytest.raises(ValueError, match="square"):
        _model(channel_heads=3)
    with pytest.raises(ValueError, match="cross_task_reweighting needs prompt_len 1"):
        _model(cross_task_reweighting=True, prompt_len=2)
