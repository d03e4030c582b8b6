"""TaskPrompter: prompts carried through the ViT's own blocks, spatial/channel task features, contract."""

from __future__ import annotations

import pytest
import torch

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


def test_block_walk_reproduces_the_vit_without_prompts():
    torch.manual_seed(0)
    prompter = _model().decoder.prompter.eval()
    x, grid = prompter._embed(torch.randn(1, 3, 64, 64))
    empty = x.new_zeros(1, 0, x.shape[-1])
    for i, blk in enumerate(prompter.vit.blocks[:3]):
        ours, *_ = prompter._layer(i, x, empty, grid)
        assert torch.allclose(ours, blk(x), atol=1e-5), i
        x = ours


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


def test_each_task_loss_reaches_its_own_prompt_and_the_shared_blocks():
    torch.manual_seed(0)
    model = _model()
    out = model(torch.randn(2, 3, 64, 64)).predictions
    prompts = model.decoder.prompter.prompts
    qkv = model.decoder.prompter.vit.blocks[0].attn.qkv.weight
    for i, t in enumerate(TASKS3):
        g_prompt, g_qkv = torch.autograd.grad(out[t].square().mean(), [prompts, qkv], retain_graph=True)
        assert g_prompt[i].abs().sum() > 0 and g_qkv.abs().sum() > 0, t


def test_subset_forward_matches_full_and_task_parameters_are_isolated():
    torch.manual_seed(0)
    model = _model().eval()
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


def test_single_task_and_prompt_length():
    model = _model(tasks=("depth",), prompt_len=2)
    assert model.decoder.prompter.prompts.shape == (2, 192)
    assert model(torch.randn(2, 3, 48, 64)).predictions["depth"].shape == (2, 1, 48, 64)


def test_refuses_non_vit_backbones_and_bad_options():
    with pytest.raises(TaskPromptError) as info:
        _model(backbone={"name": "test_resnet"})
    assert isinstance(info.value, MTVisionError)
    with pytest.raises(ValueError, match="square"):
        _model(channel_heads=3)
