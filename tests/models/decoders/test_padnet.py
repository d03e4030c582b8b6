"""PAD-Net / MTI-Net-style distillation decoder: the distillation rule, deep supervision, contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.invpt import DecoderStrideError
from mtvision.models.decoders.padnet import AttentionDistillation, DistillationDecoder
from mtvision.tasks import resolve_tasks

TASKS3 = ("semseg", "depth", "normals")
SMALL = dict(neck_channels=16, task_channels=12, head_channels=8)
RESNET = {"name": "test_resnet"}
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "dynamic_img_size": True, "depth": 4}}


def _model(backbone=RESNET, tasks=TASKS3, num_classes=5, **options):
    spec = {t: (num_classes if t == "semseg" else None) for t in tasks}
    return create_model(backbone=backbone, decoder="padnet", tasks=spec, decoder_options={**SMALL, **options})


def test_distillation_follows_the_gated_message_rule():
    torch.manual_seed(0)
    mod = AttentionDistillation(["a", "b", "c"], 4)
    feats = {t: torch.randn(2, 4, 5, 6) for t in "abc"}
    out = mod(feats, ["a", "c"])
    assert list(out) == ["a", "c"]
    for t in ("a", "c"):
        gate = torch.sigmoid(mod.gates[t](feats[t]))
        expected = feats[t] + sum(gate * mod.messages[s](feats[s]) for s in "abc" if s != t)
        assert torch.allclose(out[t], expected, atol=1e-6)
    # one task: nothing to distil, no parameters, identity
    single = AttentionDistillation(["a"], 4)
    assert not list(single.parameters())
    assert single({"a": feats["a"]}, ["a"])["a"] is feats["a"]


@pytest.mark.parametrize("multi_scale", [False, True], ids=["padnet", "mtinet"])
@pytest.mark.parametrize("backbone", [RESNET, VIT], ids=["resnet", "vit"])
def test_any_size_outputs_and_aux_only_in_training(backbone, multi_scale):
    torch.manual_seed(0)
    model = _model(backbone, multi_scale=multi_scale)
    assert isinstance(model.decoder, DistillationDecoder)
    output = model(torch.randn(2, 3, 70, 90))
    out, deep = output.predictions, output.deep_supervision
    assert {t: tuple(out[t].shape) for t in TASKS3} == {"semseg": (2, 5, 70, 90), "depth": (2, 1, 70, 90), "normals": (2, 3, 70, 90)}
    aux = deep["depth"]
    assert len(aux) == (len(model.decoder.backbone.strides) if multi_scale else 1)
    assert aux[0].shape == (2, 1, 70, 90)
    loss = sum(o.square().mean() for o in out.values())
    loss = loss + sum(a.square().mean() for v in deep.values() for a in v)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).deep_supervision == {}


def test_other_tasks_features_reach_a_task_through_distillation():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = model(x).predictions
        h = model.decoder.scales[0].features["semseg"].register_forward_hook(lambda m, i, o: o + 1.0)
        moved = model(x).predictions
        h.remove()
    assert (moved["depth"] - base["depth"]).abs().max() > 1e-4
    # a single-task model is plain prediction: its distillation holds nothing
    single = _model(tasks=("depth",))
    assert not list(single.decoder.scales[0].distill.parameters())
    assert single(torch.randn(2, 3, 48, 40)).predictions["depth"].shape == (2, 1, 48, 40)


def test_permuting_task_order_permutes_outputs():
    torch.manual_seed(0)
    a = _model(tasks=("semseg", "depth", "normals")).eval()
    b = _model(tasks=("depth", "normals", "semseg")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        oa, ob = a(x).predictions, b(x).predictions
    for t in TASKS3:
        assert torch.allclose(oa[t], ob[t], atol=1e-5), t


@pytest.mark.parametrize("multi_scale", [False, True], ids=["padnet", "mtinet"])
def test_subset_forward_matches_full(multi_scale):
    torch.manual_seed(0)
    model = _model(multi_scale=multi_scale).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, only = model(x).predictions, model(x, tasks=["semseg"]).predictions
    assert list(only) == ["semseg"] and torch.allclose(only["semseg"], full["semseg"], atol=1e-5)
    model.train()
    assert set(model(x, tasks=["depth"]).deep_supervision) == {"depth"}


@pytest.mark.parametrize("multi_scale", [False, True], ids=["padnet", "mtinet"])
def test_shared_representation_and_task_parameters(multi_scale, synthetic_batch):
    torch.manual_seed(0)
    model = _model(multi_scale=multi_scale, num_classes=synthetic_batch["num_classes"])
    output = model(synthetic_batch["image"][:2])
    out, reps = output.predictions, output.shared
    assert len(reps) == (len(model.decoder.backbone.strides) if multi_scale else 1)
    for t in TASKS3:
        loss = model.tasks[t].loss(out[t], synthetic_batch[t][:2])
        grads = torch.autograd.grad(loss, reps, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), t
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS3}
    assert not per_task["semseg"] & per_task["depth"]
    shared = {id(p) for p in model.shared_parameters()}
    branch = model.decoder.scales[0]
    assert {id(p) for p in branch.features.parameters()} <= shared  # read by other tasks' distillation
    assert {id(p) for p in branch.distill.messages.parameters()} <= shared
    assert {id(p) for p in branch.distill.gates["depth"].parameters()} <= per_task["depth"]
    model.zero_grad()
    out["depth"].square().mean().backward(retain_graph=True)
    for t in ("semseg", "normals"):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters(t)), t
    model.zero_grad()
    sum(a.square().mean() for a in output.deep_supervision["semseg"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters("depth"))
    assert len(output.branches) == (0 if multi_scale else len(model.decoder.backbone.strides))


class _FakeBackbone(nn.Module):
    def __init__(self, strides):
        super().__init__()
        self.strides, self.channels = list(strides), [8] * len(strides)


@pytest.mark.parametrize("strides", [[14], [8, 4], [4, 12]])
def test_unfit_strides_raise_a_clear_error(strides):
    tasks = resolve_tasks(["depth", "normals"], {})
    with pytest.raises(DecoderStrideError) as info:
        DistillationDecoder(lambda: _FakeBackbone(strides), tasks)
    assert isinstance(info.value, MTVisionError)


def test_learns_on_synthetic_scenes(synthetic_batch):
    torch.manual_seed(0)
    tasks = ("semseg", "depth")
    model = _model(tasks=tasks, num_classes=synthetic_batch["num_classes"])
    images = synthetic_batch["image"][:4]

    def loss_of(out):
        total = sum(model.tasks[t].loss(out.predictions[t], synthetic_batch[t][:4]) for t in tasks)
        return total + sum(model.tasks[t].loss(a, synthetic_batch[t][:4]) for t, deep in out.deep_supervision.items() for a in deep)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(model(images))
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] * 0.95, losses
