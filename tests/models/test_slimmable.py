"""Slimmable convolutions and switchable batch norm: channel prefixes of one set of weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtvision.models.slimmable import (
    SlimConv2d,
    SlimmableError,
    SwitchableBatchNorm2d,
    check_widths,
    current_widths,
    make_slimmable,
    slim_channels,
    use_widths,
    width_of,
)

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def test_slim_channels_rounds_and_keeps_one():
    assert [slim_channels(48, w) for w in WIDTHS] == [12, 24, 36, 48]
    assert slim_channels(10, 0.25) == 3  # 2.5 rounds up
    assert slim_channels(3, 0.25) == 1  # 0.75 -> 1
    assert slim_channels(1, 0.25) == 1


def test_widths_must_be_distinct_multipliers_in_the_unit_interval():
    assert check_widths([1.0, 0.5]) == (0.5, 1.0)
    assert check_widths([0.75, 0.5]) == (0.5, 0.75)  # a grid below the full network
    for bad in ([0.0, 1.0], [0.5, 0.5, 1.0], [1.5, 1.0], [-0.5], []):
        with pytest.raises(SlimmableError):
            check_widths(bad)


def test_context_is_scoped_and_defaults_to_full_width():
    assert current_widths() is None and width_of("encoder") == 1.0
    with use_widths({"encoder": 0.5}):
        assert width_of("encoder") == 0.5 and width_of("decoder/depth") == 1.0
        with use_widths({"encoder": 0.25}):
            assert width_of("encoder") == 0.25
        assert width_of("encoder") == 0.5
    assert current_widths() is None


def test_slim_conv_is_the_weight_prefix():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, stride=2)
    slim = SlimConv2d.from_conv(conv, key="k")
    assert slim.weight is conv.weight and slim.bias is conv.bias  # the same tensors, not copies
    x = torch.randn(2, 4, 9, 7)  # half of the 8 input channels
    with use_widths({"k": 0.5}):
        y = slim(x)
    expected = F.conv2d(x, conv.weight[:6, :4], conv.bias[:6], stride=2, padding=1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(slim(torch.randn(1, 8, 5, 5)).shape, torch.Size([1, 12, 3, 3]))
    keep = SlimConv2d.from_conv(conv, key="k", slim_out=False)
    with use_widths({"k": 0.25}):
        assert keep(x).shape[1] == 12


def test_depthwise_conv_follows_its_input():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    slim = SlimConv2d.from_conv(conv, key="k")
    x = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(slim(x), F.conv2d(x, conv.weight[:6], None, padding=1, groups=6), rtol=0, atol=0)


def test_grouped_and_oversized_inputs_are_refused():
    with pytest.raises(SlimmableError, match="grouped"):
        SlimConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2), key="k")
    slim = SlimConv2d.from_conv(nn.Conv2d(4, 4, 1), key="k")
    with pytest.raises(SlimmableError, match="input channels"):
        slim(torch.randn(1, 5, 2, 2))


def test_switchable_bn_keeps_private_statistics_per_width():
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(8)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.running_mean.uniform_(-1, 1)
    sbn = SwitchableBatchNorm2d.from_bn(bn, "k", (0.5, 1.0))
    assert sbn.copies["w0"].num_features == 4 and sbn.copies["w1"].num_features == 8
    torch.testing.assert_close(sbn.copies["w0"].weight, bn.weight[:4])  # initialised from the prefix
    torch.testing.assert_close(sbn.copies["w0"].running_mean, bn.running_mean[:4])
    sbn.train()
    batch = torch.randn(4, 4, 3, 3) + 5.0
    with use_widths({"k": 0.5}):
        sbn(batch)
    # only the half-width copy saw the batch (momentum 0.1)
    expected = 0.9 * bn.running_mean[:4] + 0.1 * batch.mean(dim=(0, 2, 3))
    torch.testing.assert_close(sbn.copies["w0"].running_mean, expected)
    torch.testing.assert_close(sbn.copies["w1"].running_mean, bn.running_mean)
    with use_widths({"k": 0.75}), pytest.raises(SlimmableError, match="not one the layers were built for"):
        sbn(torch.randn(1, 6, 2, 2))
    with pytest.raises(SlimmableError, match="expects 8 channels"):
        sbn(torch.randn(1, 4, 2, 2))


def test_conditioned_bn_has_a_copy_per_pair():
    sbn = SwitchableBatchNorm2d(16, "decoder/a", (0.5, 1.0), condition="encoder")
    assert sorted(sbn.copies) == ["w0_c0", "w0_c1", "w1_c0", "w1_c1"]
    with use_widths({"encoder": 0.5, "decoder/a": 1.0}):
        assert sbn.active() is sbn.copies["w1_c0"]


def test_make_slimmable_converts_in_place_and_refuses_other_layers():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    make_slimmable(net, "k", WIDTHS, keep_out=[net[3]])
    assert isinstance(net[0], SlimConv2d) and isinstance(net[1], SwitchableBatchNorm2d)
    assert net[0].slim_out and not net[3].slim_out
    net.eval()
    with use_widths({"k": 0.5}):
        assert net(torch.randn(1, 3, 6, 6)).shape == (1, 2, 4, 4)
    with pytest.raises(SlimmableError, match="LayerNorm"):
        make_slimmable(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4)), "k", WIDTHS)
