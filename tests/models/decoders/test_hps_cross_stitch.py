"""HPS and cross-stitch decoders on every backbone family: shapes, gradients, learning, task subsets."""

from __future__ import annotations

import pytest
import torch

from mtvision.models import create_model
from mtvision.models.decoders import CrossStitchDecoder, HPSDecoder

TASKS3 = ("semseg", "depth", "normals")


def _model(backbone, decoder, tasks=TASKS3, num_classes=10, **options):
    spec = {t: (num_classes if t == "semseg" else None) for t in tasks}
    return create_model(backbone=backbone, decoder=decoder, tasks=spec, decoder_options=options)


def _total_loss(model, out, batch):
    return sum(model.tasks[t].loss(out[t], batch[t]) for t in out)


@pytest.mark.parametrize("decoder", ["hps", "cross_stitch"])
def test_family_feeds_decoder_and_learns(tiny_backbone, decoder, synthetic_batch):
    torch.manual_seed(0)
    # cross-stitch builds one column per task: two tasks keep it quick
    tasks = TASKS3 if decoder == "hps" else ("semseg", "normals")
    num_classes = synthetic_batch["num_classes"]
    model = _model(tiny_backbone, decoder, tasks=tasks, num_classes=num_classes, neck_channels=32, head_channels=16)
    images = synthetic_batch["image"][:4]
    batch = {t: synthetic_batch[t][:4] for t in tasks}
    model.train()
    out = model(images).predictions
    assert list(out) == list(tasks)
    expected = {"semseg": (4, num_classes, 64, 80), "depth": (4, 1, 64, 80), "normals": (4, 3, 64, 80)}
    assert {t: tuple(o.shape) for t, o in out.items()} == {t: expected[t] for t in tasks}
    loss = _total_loss(model, out, batch)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = loss.item()
    for _ in range(4):
        opt.zero_grad()
        step_loss = _total_loss(model, model(images).predictions, batch)
        step_loss.backward()
        opt.step()
    with torch.no_grad():
        last = _total_loss(model, model(images).predictions, batch).item()
    assert last < first * 0.95, (first, last)


def _count_head_calls(model):
    calls = {t: 0 for t in model.tasks}
    for t, head in model.decoder.heads.items():
        head.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    return calls


@pytest.mark.parametrize("decoder", ["hps", "cross_stitch"])
def test_single_task_forward_runs_only_that_head_and_matches(decoder):
    torch.manual_seed(0)
    model = _model({"name": "test_resnet"}, decoder, neck_channels=16, head_channels=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x).predictions
        calls = _count_head_calls(model)
        only = model(x, tasks=["depth"]).predictions
    assert list(only) == ["depth"]
    assert calls == {"semseg": 0, "depth": 1, "normals": 0}
    assert torch.allclose(only["depth"], full["depth"], atol=1e-5)


def test_hps_shared_representation_carries_every_task_loss(synthetic_batch):
    torch.manual_seed(0)
    model = _model({"name": "test_resnet"}, "hps", num_classes=synthetic_batch["num_classes"], neck_channels=16)
    output = model(synthetic_batch["image"][:2])
    out, (rep,) = output.predictions, output.shared
    assert rep.shape == (2, 16, 16, 20)
    for t in TASKS3:
        (g,) = torch.autograd.grad(model.tasks[t].loss(out[t], synthetic_batch[t][:2]), rep, retain_graph=True)
        assert g.abs().sum() > 0, t


def test_hps_parameter_partition():
    model = _model({"name": "test_resnet"}, "hps")
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS3}
    assert shared and all(per_task.values())
    everything = {id(p) for p in model.parameters()}
    assert shared | set().union(*per_task.values()) == everything
    assert not shared & set().union(*per_task.values())
    assert not per_task["semseg"] & per_task["depth"]
    assert {id(p) for p in model.decoder.backbone.parameters()} <= shared
    # a task's loss never reaches another task's head
    out = model(torch.randn(2, 3, 32, 32)).predictions
    out["depth"].mean().backward()
    assert all(p.grad is None for p in model.task_parameters("semseg"))
    assert all(p.grad is not None for p in model.task_parameters("depth"))


def test_cross_stitch_alpha_initialisation():
    model = _model({"name": "test_resnet"}, "cross_stitch", alpha_self=0.8)
    decoder = model.decoder
    assert isinstance(decoder, CrossStitchDecoder)
    assert len(decoder.columns) == 3 and len(decoder.stitches) == len(decoder.columns[0].channels)
    alpha = decoder.stitches[0].alpha.detach()
    assert torch.allclose(alpha.diagonal(), torch.full((3,), 0.8))
    assert torch.allclose(alpha.sum(1), torch.ones(3))
    assert torch.allclose(alpha[0, 1], torch.tensor(0.1))
    wide = _model({"name": "test_resnet"}, "cross_stitch", channel_wise=True)
    assert wide.decoder.stitches[1].alpha.shape == (3, 3, wide.decoder.columns[0].channels[1])
    assert list(model.decoder.cross_stitch_parameters())[0] is decoder.stitches[0].alpha


@pytest.mark.parametrize("alpha_self, crosses", [(1.0, False), (0.9, True)])
def test_cross_stitch_units_are_the_only_link_between_columns(alpha_self, crosses):
    torch.manual_seed(0)
    model = _model({"name": "test_resnet"}, "cross_stitch", alpha_self=alpha_self)
    out = model(torch.randn(2, 3, 32, 32)).predictions
    out["depth"].square().mean().backward()
    columns = dict(zip(model.decoder.task_names, model.decoder.columns))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in columns["depth"].parameters())
    other = [p.grad for p in columns["semseg"].parameters() if p.grad is not None]
    reached = any(g.abs().sum() > 0 for g in other)
    assert reached == crosses
    # the mixing weights themselves always learn
    assert model.decoder.stitches[0].alpha.grad is not None


def test_cross_stitch_has_no_shared_representation_but_shares_columns():
    model = _model({"name": "test_resnet"}, "cross_stitch")
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shared == [] and out.branches == []
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for c in model.decoder.columns for p in c.parameters()} <= shared
    assert {id(s.alpha) for s in model.decoder.stitches} <= shared
    assert not shared & {id(p) for p in model.task_parameters("normals")}


@pytest.mark.parametrize("decoder", ["hps", "cross_stitch"])
def test_single_task_model_is_the_same_builder_with_one_task(decoder):
    model = _model({"name": "test_resnet"}, decoder, tasks=("depth",))
    assert isinstance(model.decoder, (HPSDecoder, CrossStitchDecoder))
    out = model(torch.randn(1, 3, 48, 40)).predictions
    assert list(out) == ["depth"] and out["depth"].shape == (1, 1, 48, 40)


def test_model_rejects_unknown_task_and_bad_images():
    model = _model({"name": "test_resnet"}, "hps")
    with pytest.raises(KeyError, match="did you mean 'depth'"):
        model(torch.randn(1, 3, 32, 32), tasks=["dpth"])
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.randn(3, 32, 32))


def test_cross_stitch_refuses_backbones_it_cannot_split():
    from mtvision.models.backbones import BackboneError

    with pytest.raises(BackboneError, match="cannot be run stage by stage"):
        create_model(backbone={"name": "test_vit_relpos"}, decoder="cross_stitch", tasks=["depth", "normals"])
    # hard sharing only needs the plain forward
    model = create_model(
        backbone={"name": "test_vit_relpos", "kwargs": {"img_size": 64}}, decoder="hps", tasks=["depth"]
    )
    assert model(torch.randn(1, 3, 64, 64)).predictions["depth"].shape == (1, 1, 64, 64)
