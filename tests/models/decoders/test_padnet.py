"""PAD-Net as released: the release's layout and parameter count, its blocks against torchvision and
hand-written formulas, deep supervision, the task-subset contract and learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mtvision.errors import MTVisionError
from mtvision.models import create_model
from mtvision.models.decoders.invpt import DecoderStrideError
from mtvision.models.decoders.padnet import Bottleneck, FuseLevels, MultiModalDistillation, PADNetDecoder
from mtvision.tasks import resolve_tasks

TASKS3 = ("semseg", "depth", "normals")
SMALL = dict(head_channels=8, neck_channels=16)
RESNET = {"name": "test_resnet"}
HRNET = {"name": "hrnet_w18_small_v2", "kwargs": {"feature_location": ""}, "upsample_mode": "bilinear"}


def _model(backbone=RESNET, tasks=TASKS3, num_classes=5, **options):
    spec = {t: (num_classes if t == "semseg" else None) for t in tasks}
    return create_model(backbone=backbone, decoder="padnet", tasks=spec, decoder_options={**SMALL, **options})


def test_release_layout_on_hrnet18_has_the_release_parameter_count():
    torch.manual_seed(0)
    model = create_model(backbone=HRNET, decoder="padnet", tasks={"semseg": 40, "depth": None})
    decoder = model.decoder
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # configs/nyud/hrnet18/pad_net.yml of the release: 7,019,056 parameters, 3,860,720 in the HRNet
    assert (count(model), count(decoder.backbone)) == (7_019_056, 3_860_720)
    assert decoder.fuse.out_channels == 270 and decoder.fuse.proj[0].bias is not None
    block = decoder.distillation.messages["semseg"]["depth"]
    assert block.attention.bias is None and block.conv.bias is None
    assert list(decoder.distillation.messages["depth"]) == ["semseg"]  # one block per (target, source)


def test_bottleneck_is_torchvisions():
    torch.manual_seed(0)
    mine = Bottleneck(12, 4, 16).eval()
    for m in mine.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    ref = torchvision.models.resnet.Bottleneck(12, 4, downsample=nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16)))
    ref.load_state_dict(mine.state_dict())
    ref.eval()
    x = torch.randn(2, 12, 5, 6)
    torch.testing.assert_close(mine(x), ref(x))
    assert Bottleneck(16, 4, 16).downsample is None  # identity shortcut at equal widths


def test_distillation_messages_are_gated_by_the_source_feature():
    torch.manual_seed(0)
    mod = MultiModalDistillation(["a", "b", "c"], 4)
    feats = {t: torch.randn(2, 4, 5, 6) for t in "abc"}
    out = mod(feats, ["a", "c"])
    assert list(out) == ["a", "c"]
    for t in ("a", "c"):
        expected = feats[t].clone()
        for s in "abc":
            if s != t:
                block = mod.messages[t][s]
                gate = torch.sigmoid(F.conv2d(feats[s], block.attention.weight, padding=1))
                expected = expected + F.conv2d(feats[s], block.conv.weight, padding=1) * gate
        torch.testing.assert_close(out[t], expected, atol=1e-6, rtol=1e-5)
    single = MultiModalDistillation(["a"], 4)  # one task: nothing to distil, no parameters, identity
    assert not list(single.parameters())
    assert single({"a": feats["a"]}, ["a"])["a"] is feats["a"]


def test_fuse_concatenates_levels_resized_to_the_finest():
    torch.manual_seed(0)
    fuse = FuseLevels([2, 3]).eval()
    a, b = torch.randn(1, 2, 8, 6), torch.randn(1, 3, 4, 3)
    cat = torch.cat([a, F.interpolate(b, size=(8, 6), mode="bilinear", align_corners=False)], 1)
    conv, bn = fuse.proj[0], fuse.proj[1]
    expected = torch.relu(F.batch_norm(F.conv2d(cat, conv.weight, conv.bias), bn.running_mean, bn.running_var, bn.weight, bn.bias))
    torch.testing.assert_close(fuse([a, b]), expected)


def test_outputs_deep_supervision_in_training_and_any_input_size():
    torch.manual_seed(0)
    model = _model()
    assert isinstance(model.decoder, PADNetDecoder)
    output = model(torch.randn(2, 3, 64, 96))
    out, deep = output.predictions, output.deep_supervision
    assert {t: tuple(out[t].shape) for t in TASKS3} == {"semseg": (2, 5, 64, 96), "depth": (2, 1, 64, 96), "normals": (2, 3, 64, 96)}
    assert [tuple(a.shape) for a in deep["depth"]] == [(2, 1, 16, 24)]  # the initial prediction at stride 4
    loss = sum(o.square().mean() for o in out.values()) + sum(a.square().mean() for v in deep.values() for a in v)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).deep_supervision == {}
        odd = model(torch.randn(1, 3, 70, 90)).predictions  # padded to 96 x 96, cropped back
    assert odd["normals"].shape == (1, 3, 70, 90)


def test_initial_features_of_other_tasks_reach_a_task_only_through_distillation():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = model(x).predictions
        h = model.decoder.initial["semseg"].register_forward_hook(lambda m, i, o: o + 1.0)
        moved = model(x).predictions
        h.remove()
        for src in model.decoder.distillation.messages["depth"].values():
            src.conv.weight.zero_()
        cut = model(x).predictions
        h = model.decoder.initial["semseg"].register_forward_hook(lambda m, i, o: o + 1.0)
        cut_moved = model(x).predictions
        h.remove()
    assert (moved["depth"] - base["depth"]).abs().max() > 1e-4
    torch.testing.assert_close(cut_moved["depth"], cut["depth"])  # no message into depth: independent of semseg


def test_subset_forward_matches_full_and_permuting_tasks_permutes_outputs():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, only = model(x).predictions, model(x, tasks=["semseg"]).predictions
    assert list(only) == ["semseg"] and torch.allclose(only["semseg"], full["semseg"], atol=1e-6)
    b = _model(tasks=("depth", "normals", "semseg")).eval()
    b.load_state_dict(model.state_dict())
    with torch.no_grad():
        permuted = b(x).predictions
    for t in TASKS3:
        torch.testing.assert_close(permuted[t], full[t], atol=1e-5, rtol=1e-5)
    model.train()
    assert set(model(x, tasks=["depth"]).deep_supervision) == {"depth"}


def test_shared_representation_and_task_parameters(synthetic_batch):
    torch.manual_seed(0)
    model = _model(num_classes=synthetic_batch["num_classes"])
    output = model(synthetic_batch["image"][:2])
    out, reps = output.predictions, output.shared
    assert len(reps) == 1 and reps[0].shape[1] == 16  # the fused map (neck_channels)
    assert len(output.branches) == len(model.decoder.backbone.strides)
    for t in TASKS3:
        loss = model.tasks[t].loss(out[t], synthetic_batch[t][:2])
        (g,) = torch.autograd.grad(loss, reps, retain_graph=True)
        assert g.abs().sum() > 0, t
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS3}
    assert not per_task["semseg"] & per_task["depth"]
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.decoder.initial.parameters()} <= shared  # read by other tasks' distillation
    assert {id(p) for p in model.decoder.distillation.messages["depth"].parameters()} <= per_task["depth"]
    model.zero_grad()
    out["depth"].square().mean().backward(retain_graph=True)
    for t in ("semseg", "normals"):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters(t)), t
    model.zero_grad()
    sum(a.square().mean() for a in output.deep_supervision["semseg"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters("depth"))


class _FakeBackbone(nn.Module):
    def __init__(self, strides):
        super().__init__()
        self.strides, self.channels = list(strides), [8] * len(strides)


@pytest.mark.parametrize("strides", [[14], [8, 4], [4, 12]])
def test_unfit_strides_and_widths_raise_clear_errors(strides):
    tasks = resolve_tasks(["depth", "normals"], {})
    with pytest.raises(DecoderStrideError) as info:
        PADNetDecoder(lambda: _FakeBackbone(strides), tasks)
    assert isinstance(info.value, MTVisionError)
    with pytest.raises(ValueError, match="multiple of 4"):
        PADNetDecoder(lambda: _FakeBackbone([4]), tasks, head_channels=10)


def test_learns_on_synthetic_scenes(synthetic_batch):
    torch.manual_seed(0)
    tasks = ("semseg", "depth")
    model = _model(tasks=tasks, num_classes=synthetic_batch["num_classes"])
    images = synthetic_batch["image"][:4]

    def loss_of(out):
        total = sum(model.tasks[t].loss(out.predictions[t], synthetic_batch[t][:4]) for t in tasks)
        return total + sum(model.tasks[t].loss(F.interpolate(a, size=images.shape[-2:], mode="bilinear"), synthetic_batch[t][:4])
                           for t, deep in out.deep_supervision.items() for a in deep)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(model(images))
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] * 0.95, losses
