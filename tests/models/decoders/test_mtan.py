"""MTAN: the benchmark's SegNet-MTAN layout and parameter count, what its attention masks do, the
task-subset and shared-representation contracts, and the form over timm CNN stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtvision.models import create_model
from mtvision.models.decoders.mtan import AttentionMask, MTANDecoder
from mtvision.optim.aggregators import EqualWeights
from mtvision.optim.calibrator import GradientCalibrator

TASKS = {"semseg": 13, "depth": None, "normals": None}
TINY = {"name": "segnet", "pretrained": False, "kwargs": {"widths": [4, 8, 8, 16, 16]}}


def _segnet_mtan(backbone=TINY, tasks=TASKS, **options):
    torch.manual_seed(0)
    return create_model(backbone=backbone, decoder="mtan", tasks=tasks, decoder_options=options)


def _losses(out, target_seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(target_seed)
    return {t: (p * torch.randn(p.shape, generator=g)).mean() for t, p in out.predictions.items()}


def _open_masks(decoder: MTANDecoder) -> None:
    """Every attention mask outputs exactly 1 (its last BatchNorm: weight 0, bias 50; sigmoid(50) == 1 in float32)."""
    for m in decoder.modules():
        if isinstance(m, AttentionMask):
            m[4].weight.data.zero_()
            m[4].bias.data.fill_(50.0)


def test_segnet_mtan_is_the_benchmark_network():
    model = _segnet_mtan(backbone={"name": "segnet", "pretrained": False})
    # lorenmt/mtan@c36c30b im2im_pred/model_segnet_mtan.py builds 44,229,076 trainable parameters, 3 of
    # them the task-uncertainty log-sigmas (mtvision's UW weighting holds those): 44,229,073
    assert sum(p.numel() for p in model.parameters()) == 44_229_073
    d = model.decoder
    column = d.columns["semseg"]
    assert [m[0].in_channels for m in column.encoder] == [64, 256, 512, 1024, 1024]
    assert [m[0].out_channels for m in column.encoder] == [64, 128, 256, 512, 512]
    assert [m[0].in_channels for m in column.decoder] == [128, 192, 384, 768, 1024]
    assert [m[3].out_channels for m in column.decoder] == [64, 64, 128, 256, 512]
    assert [b[0].out_channels for b in d.encoder_shared] == [128, 256, 512, 512, 512]
    assert [b[0].in_channels for b in d.decoder_shared] == [64, 128, 256, 512, 512]
    head = d.heads["semseg"]
    assert (head[0].kernel_size, head[1].kernel_size, head[1].out_channels) == ((3, 3), (1, 1), 13)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in head.modules())


def test_forward_backward_at_any_size():
    model = _segnet_mtan()
    x = torch.randn(2, 3, 32, 48)
    out = model(x)
    assert {t: tuple(p.shape) for t, p in out.predictions.items()} == {
        "semseg": (2, 13, 32, 48), "depth": (2, 1, 32, 48), "normals": (2, 3, 32, 48)
    }
    sum(_losses(out).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_open_masks_pass_the_shared_segnet_features_through():
    model = _segnet_mtan().eval()
    _open_masks(model.decoder)
    x = torch.randn(2, 3, 32, 64)
    out = model(x).predictions
    shared = model.decoder.backbone(x)[0]  # the SegNet's own output
    for t in TASKS:
        torch.testing.assert_close(out[t], model.decoder.heads[t](shared), rtol=0, atol=0)
    # the shared attention blocks then do not matter: the decoder's last mask hides them
    for p in model.decoder.decoder_shared.parameters():
        p.data.normal_()
    torch.testing.assert_close(model(x).predictions["depth"], out["depth"], rtol=0, atol=0)


def test_task_subset_runs_one_attention_column():
    model = _segnet_mtan()
    x = torch.randn(2, 3, 32, 64)
    full = model.eval()(x).predictions
    only = model(x, tasks=["depth"]).predictions
    assert list(only) == ["depth"]
    torch.testing.assert_close(only["depth"], full["depth"])
    model.train()
    model(x, tasks=["depth"]).predictions["depth"].mean().backward()
    assert all(p.grad is None for t in ("semseg", "normals") for p in model.task_parameters(t))
    own = {id(p) for t in TASKS for p in model.task_parameters(t)}
    shared = list(model.shared_parameters())
    assert len(own) == sum(1 for t in TASKS for _ in model.task_parameters(t))  # disjoint
    assert {id(p) for p in model.decoder.backbone.parameters()} <= {id(p) for p in shared}
    assert {id(p) for p in model.decoder.encoder_shared.parameters()} <= {id(p) for p in shared}


def test_shared_maps_are_a_cut_for_feature_level_calibration():
    model = _segnet_mtan()
    x = torch.randn(2, 3, 32, 64)
    sum(_losses(model(x)).values()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert len(out.shared) == 20 and out.branches == []
    GradientCalibrator(model, EqualWeights(), "features").backward(_losses(out), features=out.shared)
    for n, p in model.named_parameters():  # equal weights: exactly the plain gradient of the summed losses
        torch.testing.assert_close(p.grad, expected[n], msg=n)


@pytest.mark.parametrize("backbone", [{"name": "test_resnet"}, {"name": "test_convnext"}])
def test_attention_over_timm_stages(backbone):
    model = _segnet_mtan(backbone=backbone, tasks={"semseg": 5, "depth": None}, neck_channels=16, head_channels=8)
    x = torch.randn(2, 3, 64, 80)
    out = model(x)
    assert out.predictions["semseg"].shape == (2, 5, 64, 80) and len(out.shared) == len(model.decoder.backbone.channels)
    sum(_losses(out).values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    _open_masks(model.decoder)
    d = model.decoder
    features = d.backbone(x)
    for t in ("semseg", "depth"):  # open masks: each task's neck and head read the backbone's stages
        expect = nn.functional.interpolate(d.heads[t](d.necks[t](features)), size=(64, 80), mode="bilinear")
        torch.testing.assert_close(model(x, tasks=[t]).predictions[t], expect, rtol=0, atol=0)


def test_segnet_form_takes_no_options():
    with pytest.raises(ValueError, match="neck_channels"):
        _segnet_mtan(neck_channels=16)
