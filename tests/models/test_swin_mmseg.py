"""mmseg's Swin behaviour on timm's Swin: padding before the cyclic shift with the shift mask of the
padded map, no window shrinking, PatchMerging's neighbour order, and the backbone option."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

from mtvision.models.backbones import BackboneError, create_backbone
from mtvision.models.swin_mmseg import (
    MMSegWindowBlock,
    mmseg_merging_to_timm,
    shift_window_mask,
    use_mmseg_windows,
)

TINY_SWIN = dict(depths=(2, 2, 2, 2), embed_dim=16, num_heads=(1, 1, 2, 2), window_size=4)


def _block(window: int, shift: int, size=(8, 8)) -> SwinTransformerBlock:
    torch.manual_seed(0)
    block = SwinTransformerBlock(
        dim=8, input_resolution=size, num_heads=2, window_size=window, shift_size=shift,
        always_partition=True, dynamic_mask=True,
    )  # fmt: skip
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)  # make positions matter
    return block.eval()


@pytest.mark.parametrize("size, window", [((8, 12), 4), ((12, 7), 4), ((5, 7), 7)])
def test_shift_mask_is_timms_mask_of_the_padded_map(size, window):
    shift = window // 2
    padded = [s + (-s) % window for s in size]
    expected = _block(window, shift).get_attn_mask(torch.zeros(1, *padded, 1))
    got = shift_window_mask(*padded, (window, window), (shift, shift))
    assert torch.equal(got, expected)
    if padded[0] > window and padded[1] > window:  # the top-left window holds one region
        assert torch.equal(got[0], torch.zeros_like(got[0]))
    else:  # one 7 x 7 window, shift 3: regions of 4 x 4, 4 x 3, 3 x 4 and 3 x 3 tokens
        assert int((got[0] == 0).sum()) == 16**2 + 2 * 12**2 + 9**2


@pytest.mark.parametrize("size, window, shift", [((5, 7), 4, 2), ((4, 6), 7, 3), ((10, 9), 4, 0), ((9, 13), 4, 2)])
def test_attention_pads_to_window_multiples_before_the_shift(size, window, shift):
    timm_block = _block(window, shift)
    mmseg_block = copy.deepcopy(timm_block)
    mmseg_block.__class__ = MMSegWindowBlock
    x = torch.randn(2, *size, 8)
    pad = (0, 0, 0, (-size[1]) % window, 0, (-size[0]) % window)
    with torch.no_grad():
        got = mmseg_block._attn(x)
        # mmseg's order: zero-pad first, then roll, attend and roll back on the padded map, then crop
        expected = timm_block._attn(F.pad(x, pad))[:, : size[0], : size[1]]
        timm_order = timm_block._attn(x)  # timm rolls the unpadded map, then pads
    assert got.shape == x.shape
    assert torch.allclose(got, expected, atol=1e-6)
    if shift:
        assert not torch.allclose(got, timm_order, atol=1e-3)
    else:
        assert torch.allclose(got, timm_order, atol=1e-6)


def test_without_padding_the_block_is_timms():
    timm_block = _block(4, 2)
    mmseg_block = copy.deepcopy(timm_block)
    use_mmseg_windows(mmseg_block)
    assert isinstance(mmseg_block, MMSegWindowBlock)
    x = torch.randn(1, 8, 12, 8)
    with torch.no_grad():
        assert torch.allclose(mmseg_block(x), timm_block(x), atol=1e-6)


def test_backbone_keeps_full_windows_and_shifts_on_small_maps():
    # 64 x 96 input: the last level is 2 x 3, smaller than the window 4 (mmseg keeps window 4, shift 2)
    mmseg = create_backbone("swin_tiny_patch4_window7_224", swin_impl="mmseg", img_size=(64, 96), **TINY_SWIN)
    blocks = [m for m in mmseg.modules() if isinstance(m, SwinTransformerBlock)]
    assert blocks and all(isinstance(b, MMSegWindowBlock) for b in blocks)
    assert all(b.window_size == (4, 4) for b in blocks)
    assert [b.shift_size for b in blocks[-2:]] == [(0, 0), (2, 2)]
    assert all(b.attn.relative_position_bias_table.shape[0] == 49 for b in blocks)
    timm_default = create_backbone("swin_tiny_patch4_window7_224", img_size=(64, 96), **TINY_SWIN)
    last = [m for m in timm_default.modules() if isinstance(m, SwinTransformerBlock)][-1]
    assert last.window_size == (2, 3) and last.shift_size == (0, 0)  # what timm does by default
    out = mmseg(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[-2:]) for o in out] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    # any input size (masks are built per forward), and the state dict keeps timm's names
    assert [tuple(o.shape[-2:]) for o in mmseg(torch.randn(1, 3, 96, 64))][-1] == (3, 2)
    assert mmseg.state_dict().keys() == timm_default.state_dict().keys()


def test_backbone_option_is_checked():
    with pytest.raises(BackboneError, match="swin_impl"):
        create_backbone("test_resnet", swin_impl="mmseg")
    with pytest.raises(BackboneError, match="valid: timm, mmseg"):
        create_backbone("swin_tiny_patch4_window7_224", swin_impl="mmcv", **TINY_SWIN)
    with pytest.raises(BackboneError, match="always_partition"):
        create_backbone("swin_tiny_patch4_window7_224", swin_impl="mmseg", always_partition=False, **TINY_SWIN)
    shrunk = _block(4, 2, size=(2, 2))
    shrunk.always_partition = False
    with pytest.raises(ValueError, match="always_partition"):
        use_mmseg_windows(shrunk)
    with pytest.raises(ValueError, match="no timm Swin"):
        use_mmseg_windows(torch.nn.Linear(2, 2))


def test_mmseg_patch_merging_weights_reordered_for_timm():
    torch.manual_seed(0)
    channels = 3
    x = torch.randn(2, 6, 4, channels)  # NHWC
    # mmseg's PatchMerging: nn.Unfold(2, stride 2) -> 4C channel-major vectors -> LayerNorm -> Linear
    mm_norm = torch.nn.LayerNorm(4 * channels)
    mm_reduction = torch.nn.Linear(4 * channels, 2 * channels, bias=False)
    with torch.no_grad():
        mm_norm.weight.normal_(1, 0.5)
        mm_norm.bias.normal_(0, 0.5)
    unfolded = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # B x L x 4C
    expected = mm_reduction(mm_norm(unfolded)).view(2, 3, 2, 2 * channels)
    merging = PatchMerging(channels)
    with torch.no_grad():
        merging.reduction.weight.copy_(mmseg_merging_to_timm(mm_reduction.weight))
        merging.norm.weight.copy_(mmseg_merging_to_timm(mm_norm.weight))
        merging.norm.bias.copy_(mmseg_merging_to_timm(mm_norm.bias))
        assert torch.allclose(merging(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="4C"):
        mmseg_merging_to_timm(torch.zeros(6))
