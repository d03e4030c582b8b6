import pytest
import torch

from mtvision.metrics import SaliencyMeter

PROB = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64).reshape(1, 1, 1, 4)
GT = torch.tensor([0.0, 1.0, 0.0, 1.0]).reshape(1, 1, 1, 4)


def _f(p, r, b2=0.3):
    return (1 + b2) * p * r / (b2 * p + r)


def test_hand_computed_pr_case():
    m = SaliencyMeter()
    m.update(PROB, GT)
    f = m.f_measures()
    # t <= 0.10: all 4 positive (P 1/2, R 1); 0.15..0.40: 3 (P 2/3, R 1); 0.45..0.60: 2 (P 1/2, R 1/2)
    # 0.65..0.90: only 0.9 (P 1, R 1/2); 0.95: nothing predicted -> F = 0
    expected = [_f(0.5, 1)] * 2 + [_f(2 / 3, 1)] * 6 + [_f(0.5, 0.5)] * 4 + [_f(1, 0.5)] * 6 + [0.0]
    assert f.tolist() == pytest.approx(expected)
    out = m.compute()
    assert out["maxF"] == pytest.approx(100 * _f(1, 0.5))  # 81.25
    # at 0.5: fg IoU = |{0.9}| / |{0.4,0.6,0.9}| = 1/3, bg IoU = |{0.1}| / |{0.1,0.4,0.6}| = 1/3
    assert out["mIoU"] == pytest.approx(100 / 3)


def test_pooled_over_dataset_not_per_image_and_merge():
    prob2 = torch.tensor([0.7, 0.2], dtype=torch.float64).reshape(1, 1, 1, 2)
    gt2 = torch.tensor([1.0, 1.0]).reshape(1, 1, 1, 2)
    a, b = SaliencyMeter(), SaliencyMeter()
    a.update(PROB, GT)
    b.update(prob2, gt2)
    a.merge(b)
    whole = SaliencyMeter()
    whole.update(torch.cat([PROB, torch.cat([prob2, prob2], -1)]), torch.cat([GT, torch.cat([gt2, gt2], -1)]))
    # pooled counts: at t in 0.65..0.70: TP = {0.9, 0.7} = 2, PP = 2, AP = 4 -> P 1, R 1/2
    assert a.f_measures()[12].item() == pytest.approx(_f(1.0, 0.5))
    # at 0.15..0.20: PP = {0.4,0.6,0.9,0.7,0.2} = 5, TP = 4 -> P 4/5, R 1: the max
    assert a.compute()["maxF"] == pytest.approx(100 * _f(0.8, 1.0))
    assert whole.state()[:19].tolist() == pytest.approx((a.state()[:19] + b.state()[:19]).tolist())


def test_ignored_pixels():
    gt = GT.clone()
    gt[..., 0] = 255
    m = SaliencyMeter()
    m.update(PROB, gt)
    ref = SaliencyMeter()
    ref.update(PROB[..., 1:], GT[..., 1:])
    assert torch.equal(m.state(), ref.state())
