"""The benchmark's SegNet: layer layout, pooling indices, initialisation and its backbone options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtvision.models import create_model
from mtvision.models.backbones import BackboneError, create_backbone
from mtvision.models.segnet import SEGNET_WIDTHS, SegNet, SegNetError

TINY = (4, 8, 8, 16, 16)


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_layer_layout_is_the_benchmarks():
    net = SegNet()
    assert net.widths == list(SEGNET_WIDTHS) == [64, 128, 256, 512, 512]
    enc = [_convs(f) + _convs(r) for f, r in zip(net.enc_first, net.enc_rest)]
    dec = [_convs(f) + _convs(r) for f, r in zip(net.dec_first, net.dec_rest)]
    assert [len(c) for c in enc] == [2, 2, 3, 3, 3] and [len(c) for c in dec] == [2, 2, 3, 3, 3]
    assert [c[0].in_channels for c in enc] == [3, 64, 128, 256, 512]
    assert [c[-1].out_channels for c in enc] == [64, 128, 256, 512, 512]
    assert [c[0].in_channels for c in dec] == [64, 128, 256, 512, 512]
    assert [c[-1].out_channels for c in dec] == [64, 64, 128, 256, 512]
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in _convs(net))
    # 3x3 convs with bias + BN (2 per channel): the count of the benchmark's shared SegNet
    expected = sum(c.in_channels * c.out_channels * 9 + 3 * c.out_channels for c in _convs(net))
    assert sum(p.numel() for p in net.parameters()) == expected


def test_initialisation():
    torch.manual_seed(0)
    net = SegNet()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            assert (m.bias == 0).all()
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    conv = net.enc_rest[4][0][0]  # 512 -> 512: Xavier-normal std sqrt(2 / (fan_in + fan_out))
    std = (2.0 / (512 * 9 + 512 * 9)) ** 0.5
    assert float(conv.weight.detach().std()) == pytest.approx(std, rel=0.02)


def test_maps_unpool_to_the_pooled_positions():
    torch.manual_seed(0)
    net = SegNet(TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    maps = net.maps(x)
    assert [m.shape[-2:] for m in maps.enc_last] == [(64 // 2**i, 96 // 2**i) for i in range(5)]
    assert [m.shape[1] for m in maps.dec_out] == [4, 4, 8, 8, 16]
    # the finest unpooled map holds the coarser decoder output at the encoder's 2x2 maxima, zeros elsewhere
    up = maps.dec_in[0]
    _, where = torch.nn.functional.max_pool2d(maps.enc_last[0], 2, 2, return_indices=True)
    assert torch.equal(up.flatten(2).gather(2, where.flatten(2)), maps.dec_out[1].flatten(2))
    windows = up.unfold(2, 2, 2).unfold(3, 2, 2)  # N x C x H/2 x W/2 x 2 x 2
    assert ((windows != 0).sum(dim=(-1, -2)) <= 1).all()
    assert torch.equal(net(x)[0], maps.dec_out[0]) and net.channels == [4] and net.strides == [1]


def test_any_input_size_comes_back_at_full_resolution():
    net = SegNet(TINY)
    out = net(torch.randn(1, 3, 50, 70))[0]
    assert out.shape == (1, 4, 50, 70)


def test_backbone_name_and_options():
    net = create_backbone("segnet", widths=TINY, bn_momentum=0.01)
    assert isinstance(net, SegNet) and net.widths == list(TINY)
    assert all(m.momentum == 0.01 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(BackboneError, match="from scratch"):
        create_backbone("segnet", pretrained=True)
    with pytest.raises(BackboneError, match="from scratch"):
        create_backbone("segnet", weights="segnet.safetensors")
    with pytest.raises(BackboneError, match="out_indices"):
        create_backbone("segnet", out_indices=[1, 2])
    with pytest.raises(BackboneError, match="img_size"):
        create_backbone("segnet", img_size=64)
    with pytest.raises(ValueError, match="five"):
        SegNet((4, 8))


def test_stage_wise_decoders_get_a_clear_error():
    with pytest.raises(SegNetError, match="stage by stage"):
        create_model(backbone={"name": "segnet", "pretrained": False, "kwargs": {"widths": TINY}},
                     decoder="cross_stitch", tasks={"semseg": 13, "depth": None})


def test_unpool_equals_torchs_and_runs_in_deterministic_mode():
    import torch.nn.functional as F

    from mtvision.models.segnet import max_unpool

    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    pooled, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    before = torch.are_deterministic_algorithms_enabled()  # earlier tiny trainings may have left it on
    try:
        torch.use_deterministic_algorithms(False)  # torch's own unpool refuses deterministic mode
        assert torch.equal(max_unpool(pooled, idx, (7, 9)), F.max_unpool2d(pooled, idx, 2, 2, output_size=(7, 9)))
        torch.use_deterministic_algorithms(True)  # train.deterministic: true
        max_unpool(pooled, idx, (7, 9)).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert x.grad is not None and int((x.grad != 0).sum()) == pooled.numel()
