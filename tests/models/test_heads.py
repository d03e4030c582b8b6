"""The multi-scale neck and the task heads."""

from __future__ import annotations

import pytest
import torch

from mtvision.models.heads import MultiScaleNeck, TaskHead


def _levels(sizes, channels, batch=2, grad=False):
    return [torch.randn(batch, c, h, w, requires_grad=grad) for (h, w), c in zip(sizes, channels)]


def test_neck_fuses_every_level_at_the_finest_resolution():
    torch.manual_seed(0)
    neck = MultiScaleNeck([8, 16, 32], [4, 8, 16], channels=24)
    feats = _levels([(17, 25), (9, 13), (5, 7)], [8, 16, 32], grad=True)
    out = neck(feats)
    assert out.shape == (2, 24, 17, 25)
    assert neck.stride == 4
    out.square().mean().backward()
    for f in feats:  # each level influences the fused map
        assert f.grad is not None and f.grad.abs().sum() > 0


def test_neck_accepts_levels_with_equal_strides():
    neck = MultiScaleNeck([16, 16, 16], [16, 16, 16], channels=8)
    out = neck(_levels([(4, 5)] * 3, [16, 16, 16]))
    assert out.shape == (2, 8, 4, 5)


def test_neck_keeps_samples_independent_in_eval():
    torch.manual_seed(0)
    neck = MultiScaleNeck([8, 16], [4, 8], channels=8).eval()
    feats = _levels([(8, 8), (4, 4)], [8, 16])
    with torch.no_grad():
        both = neck(feats)
        first = neck([f[:1] for f in feats])
    assert torch.allclose(both[:1], first, atol=1e-6)
    assert not torch.allclose(both[0], both[1])


def test_neck_rejects_bad_levels():
    with pytest.raises(ValueError, match="fine to coarse"):
        MultiScaleNeck([8, 16], [8, 4])
    neck = MultiScaleNeck([8, 16], [4, 8])
    with pytest.raises(ValueError, match="2 feature levels"):
        neck(_levels([(8, 8)], [8]))


def test_task_head_maps_to_task_channels_pointwise_last():
    torch.manual_seed(0)
    head = TaskHead(16, 5, hidden_channels=8).eval()
    x = torch.randn(1, 16, 6, 7)
    with torch.no_grad():
        y = head(x)
        x2 = x.clone()
        x2[..., 0, 0] += 10.0  # a 3x3 conv then a 1x1 conv: only the 3x3 neighbourhood changes
        y2 = head(x2)
    assert y.shape == (1, 5, 6, 7)
    changed = (y2 - y).abs().sum(1)[0] > 1e-6
    assert changed[:2, :2].all() and not changed[2:, :].any() and not changed[:, 2:].any()


def test_group_norm_option_keeps_no_batch_statistics():
    import torch

    from mtvision.models.heads import TaskHead, make_norm

    head = TaskHead(8, 2, hidden_channels=8, norm="gn").train()
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(head(x)[:2], head(x[:2]))  # each sample normalised on its own
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules())
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("ln", 8)
