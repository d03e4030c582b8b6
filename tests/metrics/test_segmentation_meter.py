import math

import pytest
import torch

from mtvision.metrics import SegmentationMeter

GT = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]]])


def test_hand_computed_confusion():
    m = SegmentationMeter(3)
    m.update(PRED, GT)
    # gt0: pred0 x1, pred1 x1; gt1: pred1 x2; gt2: pred2 x1; the ignored pixel (pred 0) is skipped
    assert m.confusion_matrix().tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert m.class_iou() == pytest.approx([50.0, 200.0 / 3, 100.0])
    out = m.compute()
    assert out["mIoU"] == pytest.approx((50.0 + 200.0 / 3 + 100.0) / 3)
    assert out["pixAcc"] == pytest.approx(80.0)


def test_absent_class_excluded_but_predicted_only_class_counts():
    m = SegmentationMeter(4)
    m.update(PRED, GT)
    assert math.isnan(m.class_iou()[3])
    assert m.compute()["mIoU"] == pytest.approx((50.0 + 200.0 / 3 + 100.0) / 3)
    m.update(torch.tensor([[[3]]]), torch.tensor([[[2]]]))  # class 3 predicted, never in gt: IoU 0
    ious = m.class_iou()
    assert ious[3] == 0.0 and ious[2] == pytest.approx(50.0)
    assert m.compute()["mIoU"] == pytest.approx((50.0 + 200.0 / 3 + 50.0 + 0.0) / 4)


def test_ignore_pixels_do_not_count_whatever_is_predicted():
    a, b = SegmentationMeter(3), SegmentationMeter(3)
    a.update(PRED, GT)
    pred2 = PRED.clone()
    pred2[0, 1, 2] = 2
    b.update(pred2, GT)
    assert torch.equal(a.state(), b.state())


def test_merge_of_halves_equals_single_pass_and_is_pooled():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 5, (4, 6, 7), generator=g)
    gt[gt == 4] = 255
    pred = torch.randint(0, 4, (4, 6, 7), generator=g)
    whole = SegmentationMeter(4)
    whole.update(pred, gt)
    h1, h2 = SegmentationMeter(4), SegmentationMeter(4)
    h1.update(pred[:1], gt[:1])
    h2.update(pred[1:], gt[1:])
    h1.merge(h2)
    assert torch.equal(h1.state(), whole.state())
    assert h1.compute() == whole.compute()
    valid = gt != 255
    assert whole.compute()["pixAcc"] == pytest.approx(100.0 * (pred[valid] == gt[valid]).double().mean().item())


def test_out_of_range_labels_rejected():
    m = SegmentationMeter(3)
    with pytest.raises(ValueError):
        m.update(torch.tensor([[[0]]]), torch.tensor([[[7]]]))
    with pytest.raises(ValueError):
        m.update(torch.tensor([[[5]]]), torch.tensor([[[0]]]))
