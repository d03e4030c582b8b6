"""SegNet, the shared network of the NYUv2-13 optimiser benchmark (backbone name `segnet`).

The encoder-decoder of Badrinarayanan et al. (TPAMI 2017) in the form MTAN (Liu et al., CVPR 2019)
and the optimiser papers after it train from scratch on NYUv2-13 at 288 x 384:

- five encoder stages of widths 64, 128, 256, 512, 512: a first 3x3 conv-BN-ReLU to the stage's
  width, then one more (stages 1-2) or two more (stages 3-5), then a 2x2 max-pool that keeps its
  indices;
- five decoder stages, coarse to fine: a 2x2 max-unpool with the matching indices, a first 3x3
  conv-BN-ReLU down to the next finer width (64 at the finest stage), then one more (the two
  finest stages) or two more;
- convolutions with a bias, Xavier-normal weights, zero biases; BatchNorm weights 1, biases 0.

`forward(images)` returns the decoder's last map (64 channels at full resolution), so any
decoder that reads one feature level (HPS: the "split" SegNet baseline) can use it; `maps(images)`
returns every stage's maps, which MTAN's attention modules read (`decoders/mtan.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import MTVisionError

SEGNET_NAME = "segnet"
"""The backbone name (`model.backbone.name`) that builds a `SegNet`."""
SEGNET_WIDTHS = (64, 128, 256, 512, 512)
"""Channel widths of the five encoder stages of the benchmark's SegNet."""



def max_unpool(x: Tensor, indices: Tensor, size: Sequence[int]) -> Tensor:
    """`F.max_unpool2d` of non-overlapping pooling (each value back at the flat position `indices`
    gives, zeros elsewhere), written as one scatter so that it also runs under
    `torch.use_deterministic_algorithms(True)` (`train.deterministic`), which refuses max_unpool2d."""
    n, c = x.shape[:2]
    out = x.new_zeros(n, c, int(size[0]) * int(size[1]))
    return out.scatter(2, indices.flatten(2), x.flatten(2)).view(n, c, int(size[0]), int(size[1]))

class SegNetError(MTVisionError, ValueError):
    """A SegNet is asked for something it does not provide."""


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (with bias, padding 1), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def extra_convs(level: int) -> int:
    """How many 3x3 conv-BN-ReLU layers follow a stage's first one at `level` (0 = finest)."""
    return 1 if level < 2 else 2


def init_segnet_weights(module: nn.Module) -> None:
    """Xavier-normal convolution and linear weights with zero biases; BatchNorm weights 1, biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegNetMaps(NamedTuple):
    """Every stage's maps of one SegNet forward; index = level, 0 the finest (stride 1).

    enc_first / enc_last: the output of encoder stage `level`'s first conv block and of its last
    one (before pooling; both at stride 2^level); dec_in: the unpooled map entering decoder stage
    `level` (stride 2^level, the coarser width); dec_out: that decoder stage's output.
    """

    enc_first: list[Tensor]
    enc_last: list[Tensor]
    dec_in: list[Tensor]
    dec_out: list[Tensor]


class SegNet(nn.Module):
    """The benchmark's SegNet (see the module docstring); `widths` may be narrowed for tests.

    Attributes:
        name: "segnet".
        widths: the encoder widths, finest first.
        channels, strides: of the one level `forward` returns ([widths[0]], [1]).
    """

    def __init__(self, widths: Sequence[int] = SEGNET_WIDTHS, in_channels: int = 3):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"SegNet needs five positive stage widths, got {widths}")
        self.name = SEGNET_NAME
        self.widths = widths
        self.channels = [widths[0]]
        self.strides = [1]
        ins = [in_channels, *widths[:-1]]
        self.enc_first = nn.ModuleList(conv_bn_relu(ins[i], widths[i]) for i in range(5))
        self.enc_rest = nn.ModuleList(
            nn.Sequential(*(conv_bn_relu(widths[i], widths[i]) for _ in range(extra_convs(i)))) for i in range(5)
        )
        outs = [widths[0], *widths[:-1]]  # decoder stage `level` maps widths[level] -> outs[level]
        self.dec_first = nn.ModuleList(conv_bn_relu(widths[i], outs[i]) for i in range(5))
        self.dec_rest = nn.ModuleList(
            nn.Sequential(*(conv_bn_relu(outs[i], outs[i]) for _ in range(extra_convs(i)))) for i in range(5)
        )
        init_segnet_weights(self)

    @property
    def decoder_widths(self) -> list[int]:
        """Output channels of each decoder stage, finest first."""
        return [self.widths[0], *self.widths[:-1]]

    def maps(self, images: Tensor) -> SegNetMaps:
        """Every stage's maps (see `SegNetMaps`)."""
        enc_first, enc_last, indices = [], [], []
        x = images
        for first, rest in zip(self.enc_first, self.enc_rest):
            a = first(x)
            b = rest(a)
            x, idx = F.max_pool2d(b, 2, 2, return_indices=True)
            enc_first.append(a)
            enc_last.append(b)
            indices.append(idx)
        dec_in: list[Tensor] = [x] * 5  # placeholders, filled coarse to fine
        dec_out: list[Tensor] = [x] * 5
        for level in range(4, -1, -1):
            up = max_unpool(x, indices[level], enc_last[level].shape[-2:])
            x = self.dec_rest[level](self.dec_first[level](up))
            dec_in[level], dec_out[level] = up, x
        return SegNetMaps(enc_first, enc_last, dec_in, dec_out)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Images N x 3 x H x W -> [the decoder's last map, N x widths[0] x H x W]."""
        return [self.maps(images).dec_out[0]]

    def prepare_stages(self) -> None:
        """A SegNet is one encoder-decoder, not a stack of stages that soft-sharing decoders can interleave."""
        raise SegNetError("backbone 'segnet' cannot be run stage by stage (cross-stitch, branched): "
                          "use it with decoder mtan or hps")
