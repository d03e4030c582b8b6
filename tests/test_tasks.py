import math

import numpy as np
import pytest
import torch

from mtvision import tasks as T
from mtvision.errors import UnknownNameError


def test_registry_has_the_six_tasks_and_the_synthetic_texture_task_with_their_channels():
    assert T.list_tasks() == ["semseg", "depth", "normals", "edge", "parts", "saliency", "texture"]
    assert [T.get_task(n).out_channels for n in ("depth", "normals", "edge", "saliency", "parts", "texture")] == [1, 3, 1, 1, 7, 2]
    assert T.get_task("semseg", num_classes=21).out_channels == 21
    assert T.resolve_tasks(["semseg", "depth"], {"semseg": 10})["semseg"].out_channels == 10


def test_bad_task_names_and_class_counts():
    with pytest.raises(UnknownNameError, match="did you mean 'normals'"):
        T.get_task("normal")
    with pytest.raises(ValueError, match="fixed number of channels"):
        T.get_task("depth", num_classes=3)
    with pytest.raises(ValueError, match=r"\[2, 255\]"):
        T.get_task("semseg", num_classes=300)
    with pytest.raises(ValueError, match="duplicate"):
        T.resolve_tasks(["depth", "depth"])


def test_segmentation_loss_ignores_255():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])  # 1 x 2 classes x 1 x 2
    target = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert T.segmentation_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    all_ignored = torch.full((1, 1, 2), 255)
    loss = T.segmentation_loss(logits.requires_grad_(), all_ignored)
    assert loss.item() == 0.0 and loss.requires_grad


def test_depth_loss_is_l1_over_valid_pixels():
    pred = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    target = torch.tensor([[[[1.5, 0.0, 1.0]]]])
    assert T.depth_loss(pred, target).item() == pytest.approx((0.5 + 2.0) / 2)


def test_normals_loss_is_one_minus_cosine_over_valid_pixels():
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0, 0])  # same direction as gt, unnormalised: loss 0
    pred[0, :, 0, 1] = torch.tensor([0.0, 3.0, 0])  # 90 degrees from gt: loss 1
    pred[0, :, 0, 2] = torch.tensor([1.0, 1.0, 1.0])  # gt invalid: ignored
    target = torch.zeros(1, 3, 1, 3)
    target[0, 0, 0, 0] = 1
    target[0, 0, 0, 1] = 1
    assert T.normals_loss(pred, target).item() == pytest.approx(0.5)


def test_the_releases_l1_normals_losses_by_hand():
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0, 0])  # same direction as gt, unnormalised: 0
    pred[0, :, 0, 1] = torch.tensor([0.0, 3.0, 0])  # unit (0, 1, 0) against (1, 0, 0): |−1| + |1| = 2
    pred[0, :, 0, 2] = torch.tensor([1.0, 1.0, 1.0])  # gt invalid: ignored
    target = torch.zeros(1, 3, 1, 3)
    target[0, 0, 0, :2] = 1
    l1 = T.with_loss(T.get_task("normals"), "l1")
    l1_mean = T.with_loss(T.get_task("normals"), "l1_mean")
    assert l1.loss(pred, target).item() == pytest.approx((0 + 2) / 2)  # summed over components, mean over pixels
    assert l1_mean.loss(pred, target).item() == pytest.approx((0 + 2) / 6)  # mean over the 6 valid components
    # the releases' own formulas on the same tensors (their ignore label 255 marks the invalid pixel)
    released = target.clone()
    released[0, :, 0, 2] = 255
    mask = (released != 255).all(dim=1, keepdim=True)
    unit = torch.nn.functional.normalize(pred, dim=1)
    atrc = torch.nn.functional.l1_loss(unit.masked_select(mask), released.masked_select(mask), reduction="sum") / mask.sum()
    assert l1.loss(pred, target).item() == pytest.approx(atrc.item())
    element_mask = released != 255
    vandenhende = (unit - released).abs().masked_select(element_mask).sum() / element_mask.sum()
    assert l1_mean.loss(pred, target).item() == pytest.approx(vandenhende.item())
    assert T.with_loss(T.get_task("normals"), "cosine").loss(pred, target).item() == pytest.approx(0.5)
    with pytest.raises(UnknownNameError, match="l2"):
        T.with_loss(T.get_task("normals"), "l2")
    with pytest.raises(ValueError, match="no loss variants"):
        T.with_loss(T.get_task("depth"), "l1")


def test_balanced_edge_loss_weights_positives_095():
    pred = torch.tensor([[[[0.0, 0.0, 3.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    ln2 = math.log(2.0)
    assert T.balanced_edge_loss(pred, target).item() == pytest.approx((0.95 * ln2 + 0.05 * ln2) / 2)
    pred = torch.tensor([[[[2.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 1.0]]]])
    soft = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log(sigmoid(x))
    assert T.balanced_edge_loss(pred, target).item() == pytest.approx(0.95 * (soft(2.0) + soft(-1.0)) / 2, rel=1e-6)


def test_saliency_loss_is_bce():
    pred = torch.tensor([[[[0.0]]]])
    assert T.saliency_loss(pred, torch.ones(1, 1, 1, 1)).item() == pytest.approx(math.log(2))


def test_balanced_saliency_loss_equals_the_releases_on_one_logit_and_on_two():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 1, 4, 5, generator=g) > 0.7).float()
    logit = torch.randn(2, 1, 4, 5, generator=g)
    balanced = T.with_loss(T.get_task("saliency"), "balanced")
    # hand formula: positives weighted by the share of negatives, negatives by the share of positives
    pos = target.sum() / target.numel()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none")
    expected = ((1 - pos) * (bce * target).sum() + pos * (bce * (1 - target)).sum()) / target.numel()
    assert balanced.loss(logit, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # the PAD-Net / MTI-Net release's BalancedCrossEntropyLoss, its stable log-sum formula
    gt_zero = (logit >= 0).float()
    val = logit * (target - gt_zero) - torch.log(1 + torch.exp(logit - 2 * logit * gt_zero))
    w = (1 - target).sum() / target.numel()
    vandenhende = (w * (-(target * val)).sum() + (1 - w) * (-((1 - target) * val)).sum()) / target.numel()
    assert balanced.loss(logit, target).item() == pytest.approx(vandenhende.item(), rel=1e-6)
    # two logits (l0, l1) with l1 - l0 = the one logit: the InvPT family's balanced 2-class cross-entropy
    two = torch.cat([torch.zeros_like(logit), logit], dim=1)
    assert balanced.loss(two, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert T.with_loss(T.get_task("saliency"), "standard").loss(logit, target).item() == pytest.approx(bce.mean().item())


def test_decoders():
    logits = torch.tensor([[[[0.1, 3.0]], [[0.5, -1.0]]]])
    assert T.get_task("semseg").decode(logits).tolist() == [[[1, 0]]]
    n = T.get_task("normals").decode(torch.tensor([[[[3.0]], [[0.0]], [[4.0]]]]))
    assert n.flatten().tolist() == pytest.approx([0.6, 0.0, 0.8])
    assert T.get_task("depth").decode(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]
    assert T.get_task("edge").decode(torch.tensor([0.0])).item() == 0.5


def test_geometry_rules():
    normals = np.array([[[0.6, 0.0, -0.8]]], np.float32)
    flipped = T.get_task("normals").flip_fn(normals)
    np.testing.assert_array_equal(flipped, np.array([[[-0.6, 0.0, -0.8]]], np.float32))
    assert normals[0, 0, 0] == pytest.approx(0.6)  # input untouched
    depth = np.array([[2.0, 0.0]], np.float32)
    np.testing.assert_array_equal(T.get_task("depth").scale_fn(depth, 2.0), [[1.0, 0.0]])
    assert T.get_task("semseg").pad_value == 255 and T.get_task("edge").pad_value == 255
    assert T.get_task("depth").pad_value == 0 and T.get_task("normals").pad_value == 0
    assert all((t.flip_fn is None) == (t.name != "normals") for t in T.TASKS.values())


def test_every_task_colorizes_its_decoded_output():
    for task in T.TASKS.values():
        raw = torch.randn(1, task.out_channels, 5, 6)
        decoded = task.decode(raw)[0].numpy()
        rgb = task.colorize(decoded)
        assert rgb.shape == (5, 6, 3) and rgb.dtype == np.uint8
