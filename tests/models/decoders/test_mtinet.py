"""MTI-Net as released: the release's parameter counts, its blocks against torchvision and hand-written
formulas (the channel-group task attention, squeeze-and-excitation), multi-scale deep supervision,
the task-subset contract and learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mtvision.models import create_model
from mtvision.models.decoders.invpt import DecoderStrideError
from mtvision.models.decoders.mtinet import BasicBlock, FeaturePropagation, MTINetDecoder, SqueezeExcitation

TASKS3 = ("semseg", "depth", "normals")
RESNET = {"name": "test_resnet"}
HRNET = {"name": "hrnet_w18_small_v2", "kwargs": {"feature_location": ""}, "upsample_mode": "bilinear"}


def _model(backbone=RESNET, tasks=TASKS3, num_classes=5):
    spec = {t: (num_classes if t == "semseg" else None) for t in tasks}
    return create_model(backbone=backbone, decoder="mtinet", tasks=spec)


def _randomise_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_release_layout_on_hrnet18_has_the_release_parameter_counts():
    torch.manual_seed(0)
    model = create_model(backbone=HRNET, decoder="mtinet", tasks={"semseg": 40, "depth": None})
    d = model.decoder
    # configs/nyud/hrnet18/mti_net.yml of the release: 8,578,179 parameters; FPM at scales 3, 2, 1
    assert _count(model) == 8_578_179 and _count(d.backbone) == 3_860_720
    assert [_count(p) for p in d.propagation] == [61_420, 244_592, 976_770]
    assert [_count(s) for s in d.scales] == [38_075, 149_981, 595_409, 1_501_241]
    assert [_count(x) for x in d.distillation] == [11_664, 46_656, 186_624, 746_496]
    assert d.propagation[0].se["depth"].squeeze[0].out_features == 2  # 36 // 16


def test_basic_block_is_torchvisions():
    torch.manual_seed(0)
    mine = BasicBlock(6, 4).eval()
    _randomise_bn(mine)
    ref = torchvision.models.resnet.BasicBlock(6, 4, downsample=nn.Sequential(nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)))
    ref.load_state_dict(mine.state_dict())
    ref.eval()
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(mine(x), ref(x))
    assert BasicBlock(4, 4).downsample is None


def test_squeeze_excitation_formula():
    torch.manual_seed(0)
    se = SqueezeExcitation(32)
    x = torch.randn(2, 32, 3, 4)
    lin1, lin2 = se.squeeze[0], se.squeeze[2]
    assert lin1.out_features == 2 and SqueezeExcitation(8).squeeze[0].out_features == 1
    scale = torch.sigmoid(F.linear(torch.relu(F.linear(x.mean((2, 3)), lin1.weight, lin1.bias)), lin2.weight, lin2.bias))
    torch.testing.assert_close(se(x), x * scale[:, :, None, None])


def test_feature_propagation_softmaxes_over_groups_of_consecutive_channels():
    torch.manual_seed(0)
    names, c = ["a", "b"], 3
    fpm = FeaturePropagation(names, c).eval()
    _randomise_bn(fpm)
    feats = {t: torch.randn(1, c, 4, 5) for t in names}
    concat = torch.cat([feats[t] for t in names], 1)  # channels a0 a1 a2 b0 b1 b2
    scores = fpm.non_linear(concat)
    attended = torch.empty_like(concat)
    for g in range(c):  # group g = channels 2g and 2g + 1 (adjacent, not "the same channel of each task")
        pair = scores[:, 2 * g : 2 * g + 2]
        attended[:, 2 * g : 2 * g + 2] = torch.softmax(pair, dim=1) * concat[:, 2 * g : 2 * g + 2]
    reduced = fpm.reduction(attended)
    out = fpm(feats)
    for t in names:
        torch.testing.assert_close(out[t], fpm.se[t](reduced) + feats[t], atol=1e-6, rtol=1e-5)


def test_each_scale_refines_the_level_concatenated_with_its_tasks_propagated_feature():
    torch.manual_seed(0)
    model = _model().eval()
    seen = {}
    hooks = [model.decoder.scales[s].refinement["depth"].register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s, i[0].shape))
             for s in range(4)]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    channels = model.decoder.backbone.channels
    assert [seen[s][1] for s in range(4)] == [channels[0] + channels[1], channels[1] + channels[2], channels[2] + channels[3], channels[3]]


def test_outputs_and_deep_supervision_at_every_scale():
    torch.manual_seed(0)
    model = _model()
    assert isinstance(model.decoder, MTINetDecoder)
    output = model(torch.randn(2, 3, 64, 96))
    out, deep = output.predictions, output.deep_supervision
    assert {t: tuple(out[t].shape) for t in TASKS3} == {"semseg": (2, 5, 64, 96), "depth": (2, 1, 64, 96), "normals": (2, 3, 64, 96)}
    assert [tuple(a.shape[-2:]) for a in deep["semseg"]] == [(16, 24), (8, 12), (4, 6), (2, 3)]  # finest first
    loss = sum(o.square().mean() for o in out.values()) + sum(a.square().mean() for v in deep.values() for a in v)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).deep_supervision == {}
        assert model(torch.randn(1, 3, 70, 90)).predictions["depth"].shape == (1, 1, 70, 90)


def test_subset_forward_matches_full_and_task_parameters(synthetic_batch):
    torch.manual_seed(0)
    model = _model(num_classes=synthetic_batch["num_classes"]).eval()
    x = synthetic_batch["image"][:2]
    with torch.no_grad():
        full, only = model(x).predictions, model(x, tasks=["normals"]).predictions
    assert list(only) == ["normals"] and torch.allclose(only["normals"], full["normals"], atol=1e-6)
    model.train()
    output = model(x)
    assert len(output.shared) == 4 and output.branches == []
    for t in TASKS3:
        loss = model.tasks[t].loss(output.predictions[t], synthetic_batch[t][:2])
        grads = torch.autograd.grad(loss, output.shared, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), t
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS3}
    assert not per_task["semseg"] & per_task["depth"]
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.decoder.propagation.parameters()} <= shared
    assert {id(p) for p in model.decoder.scales[2].refinement["depth"].parameters()} <= shared
    model.zero_grad()
    output.predictions["depth"].square().mean().backward(retain_graph=True)
    for t in ("semseg", "normals"):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters(t)), t
    assert set(model(x, tasks=["depth"]).deep_supervision) == {"depth"}


def test_backbones_whose_levels_do_not_halve_are_refused():
    with pytest.raises(DecoderStrideError, match="halve in resolution"):
        create_model(backbone={"name": "test_vit", "kwargs": {"img_size": 64, "dynamic_img_size": True}}, decoder="mtinet",
                     tasks=["depth"])


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
