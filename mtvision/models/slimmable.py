"""Slimmable convolutions and switchable batch norm: one set of weights, several channel widths.

A width is a multiplier in (0, 1] of a layer's full channel count (`slim_channels`).  A slimmed
convolution uses the first `slim_channels(C_out, w)` filters of its weight and the first input
channels the incoming tensor has, so every narrower network is a channel prefix of the wider one
(Yu et al., "Slimmable Neural Networks", ICLR 2019).  Batch-norm statistics differ per width, so a
`SwitchableBatchNorm2d` keeps one private batch norm per width choice (and, for decoder layers, per
pair of encoder and own width: the decoder's inputs change with the encoder's width too).

Which width a layer runs at is never module state: each slimmable layer has a `key` (e.g.
"encoder", "decoder/semseg") and reads the width of its key from the `use_widths` context around
the forward; with no context every layer runs at full width.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.errors import MTVisionError

_WIDTHS: contextvars.ContextVar[Mapping[str, float] | None] = contextvars.ContextVar("mtvision_widths", default=None)


class SlimmableError(MTVisionError, ValueError):
    """A module that cannot be made slimmable, or a width that the layers were not built for."""


def slim_channels(channels: int, width: float) -> int:
    """Channels of a layer of `channels` at width multiplier `width`: round(width * channels), at least 1."""
    return max(1, int(channels * float(width) + 0.5))


def check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """`widths` sorted ascending, each in (0, 1], no repeats.  The largest is usually 1.0 (the full
    network); a grid below it (e.g. `[0.5]`) builds layers that run only at those widths, inside a
    width context (outside one, the full width 1.0 is a SlimmableError)."""
    values = tuple(sorted(float(w) for w in widths))
    if not values or any(not 0.0 < w <= 1.0 for w in values) or len(set(values)) != len(values):
        raise SlimmableError(f"widths must be distinct multipliers in (0, 1], got {list(widths)}")
    return values


@contextlib.contextmanager
def use_widths(widths: Mapping[str, float]) -> Iterator[None]:
    """Run the slimmable layers inside at `widths[key]` (keys absent from `widths`: full width)."""
    token = _WIDTHS.set(dict(widths))
    try:
        yield
    finally:
        _WIDTHS.reset(token)


def current_widths() -> dict[str, float] | None:
    """The widths of the innermost `use_widths` context (None outside any)."""
    value = _WIDTHS.get()
    return None if value is None else dict(value)


def width_of(key: str) -> float:
    """The width of `key` in the active context (1.0 when none is set)."""
    value = _WIDTHS.get()
    return 1.0 if value is None else float(value.get(key, 1.0))


def width_index(widths: Sequence[float], width: float, key: str) -> int:
    """Position of `width` in the built `widths` (a SlimmableError for any other width)."""
    for i, w in enumerate(widths):
        if abs(w - width) < 1e-9:
            return i
    raise SlimmableError(f"width {width:g} for {key!r} is not one the layers were built for ({', '.join(f'{w:g}' for w in widths)})")


class SlimConv2d(nn.Conv2d):
    """A Conv2d that runs on the first input channels it receives and, when `slim_out`, on the first
    `slim_channels(out_channels, width_of(key))` filters.  Plain (groups = 1) and depthwise only."""

    def __init__(self, *args, key: str, slim_out: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.key, self.slim_out = key, slim_out

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, key: str, slim_out: bool = True) -> SlimConv2d:
        """A slimmable copy of `conv` holding the same parameter tensors."""
        if type(conv) is not nn.Conv2d:
            raise SlimmableError(f"only plain nn.Conv2d layers can be slimmed, got {type(conv).__name__}")
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        if conv.groups != 1 and not depthwise:
            raise SlimmableError(f"grouped convolutions (groups={conv.groups}) cannot be slimmed; plain and depthwise can")
        if conv.padding_mode != "zeros":
            raise SlimmableError(f"convolutions with padding_mode={conv.padding_mode!r} cannot be slimmed")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, key=key, slim_out=slim_out,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        return new

    def active_out(self, in_channels: int) -> int:
        """Output channels for an input of `in_channels` channels in the active width context."""
        if self.groups != 1:  # depthwise: one filter per input channel
            return in_channels
        return slim_channels(self.out_channels, width_of(self.key)) if self.slim_out else self.out_channels

    def forward(self, x: Tensor) -> Tensor:
        c_in = x.shape[1]
        if c_in > self.in_channels:
            raise SlimmableError(f"a {self.in_channels}-channel convolution got {c_in} input channels")
        c_out = self.active_out(c_in)
        if self.groups != 1:
            weight, groups = self.weight[:c_in], c_in
        else:
            weight, groups = self.weight[:c_out, :c_in], 1
        bias = self.bias[:c_out] if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class SwitchableBatchNorm2d(nn.Module):
    """One private BatchNorm2d per width of `key` (and per width of `condition`, when given), each
    over `slim_channels(channels, width)` channels; the active context picks which one runs."""

    def __init__(
        self,
        channels: int,
        key: str,
        widths: Sequence[float],
        condition: str | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ):
        super().__init__()
        self.channels, self.key, self.condition = channels, key, condition
        self.widths = check_widths(widths)
        conditions = range(len(self.widths)) if condition is not None else [None]
        self.copies = nn.ModuleDict({
            self._name(i, j): nn.BatchNorm2d(slim_channels(channels, w), eps=eps, momentum=momentum)
            for i, w in enumerate(self.widths) for j in conditions
        })

    @staticmethod
    def _name(own: int, condition: int | None) -> str:
        return f"w{own}" if condition is None else f"w{own}_c{condition}"

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, key: str, widths: Sequence[float], condition: str | None = None) -> SwitchableBatchNorm2d:
        """Copies of `bn`, each initialised with the channel prefix of its parameters and statistics."""
        if type(bn) is not nn.BatchNorm2d or not bn.affine or not bn.track_running_stats:
            raise SlimmableError(f"only affine BatchNorm2d with running statistics can be switched, got {bn}")
        new = cls(bn.num_features, key, widths, condition, eps=bn.eps, momentum=bn.momentum)
        new.to(device=bn.weight.device, dtype=bn.weight.dtype)
        for copy in new.copies.values():
            c = copy.num_features
            copy.weight.data.copy_(bn.weight.data[:c])
            copy.bias.data.copy_(bn.bias.data[:c])
            copy.running_mean.copy_(bn.running_mean[:c])
            copy.running_var.copy_(bn.running_var[:c])
            copy.num_batches_tracked.copy_(bn.num_batches_tracked)
        return new

    def active(self) -> nn.BatchNorm2d:
        """The batch norm of the active width context."""
        own = width_index(self.widths, width_of(self.key), self.key)
        cond = None if self.condition is None else width_index(self.widths, width_of(self.condition), self.condition)
        return self.copies[self._name(own, cond)]

    def forward(self, x: Tensor) -> Tensor:
        bn = self.active()
        if x.shape[1] != bn.num_features:
            raise SlimmableError(
                f"switchable batch norm for {self.key!r} at its active width expects {bn.num_features} channels, "
                f"got {x.shape[1]}"
            )
        return bn(x)


def _parameterised_leaves(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            yield name, m


def make_slimmable(
    module: nn.Module,
    key: str,
    widths: Sequence[float],
    condition: str | None = None,
    keep_out: Sequence[nn.Module] = (),
) -> nn.Module:
    """Turn every Conv2d of `module` into a `SlimConv2d` of `key` and every BatchNorm2d into a
    `SwitchableBatchNorm2d` (in place; returns `module`).  Convolutions in `keep_out` keep their
    full output channels (a prediction layer).  Any other layer with parameters is a SlimmableError:
    slimming supports convolutional networks built of convolutions, batch norm, activations and
    pooling (ResNets and their relatives)."""
    widths = check_widths(widths)
    keep = {id(m) for m in keep_out}
    for name, leaf in _parameterised_leaves(module):
        if type(leaf) not in (nn.Conv2d, nn.BatchNorm2d):
            raise SlimmableError(
                f"layer {name!r} ({type(leaf).__name__}) cannot be slimmed: slimmable models need layers with weights "
                "to be Conv2d or BatchNorm2d (ResNet-style CNN backbones such as resnet18, resnet34, test_resnet)"
            )
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, child_name, SlimConv2d.from_conv(child, key, slim_out=id(child) not in keep))
            elif type(child) is nn.BatchNorm2d:
                setattr(parent, child_name, SwitchableBatchNorm2d.from_bn(child, key, widths, condition))
    return module
