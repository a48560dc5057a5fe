"""A quantizer is an observer plus the fake-quantizer that rounds with the observer's range.

`QuantConfig` says how many bits and how ranges are tracked; `activation_quantizer` and `weight_quantizer` build
the two kinds the network uses: per-tensor asymmetric unsigned for activations, per-channel symmetric signed
(narrow range) for weights.
"""
from dataclasses import dataclass
from typing import Optional

from mindspore import nn, ops

from src.layers import channel_affine_act
from src.quant.fake_quant import FakeQuantize, quant_range
from src.quant.observers import MovingAverageMinMaxObserver, PerChannelAbsMaxObserver, switch_parameter


@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8
    act_bits: int = 8
    ema_decay: float = 0.999
    # Communication group over which activation ranges are agreed in data-parallel training (None: no sync).
    sync_group: Optional[str] = None


class Quantizer(nn.Cell):
    """Observes x, then fake-quantizes it with the observed range while `quant_enabled` is 1. The integer range
    [qmin, qmax] is decided here and handed to the observer (`make_observer(qmin, qmax)`) and the fake-quantizer;
    `channel_axis` is the axis of the observer's per-channel ranges (None: one range for the tensor)."""

    def __init__(self, qmin, qmax, make_observer, channel_axis=None):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.observer = make_observer(qmin, qmax)
        self.fake_quant = FakeQuantize(qmin, qmax, channel_axis)
        self.quant_enabled = switch_parameter("quant_enabled", 1.0)

    def construct(self, x):
        scale, zero_point = self.observer(x)
        return self.fake_quant(x, scale, zero_point, self.quant_enabled)

    def codes(self, x):
        """x as integer codes in [qmin, qmax] (held in float32) and their scale: a weight as the deployed model
        stores it (the observer takes x's own range, unless it is frozen)."""
        scale, zero_point = self.observer(x)
        return self.fake_quant.quantize(x, scale, zero_point), scale

    def affine_act(self, y, a, b, activation, channel_extremes):
        """Quantized act(a * y + b), with a and b per channel of y (N, C, H, W) and act ReLU6 or none: a
        quantized layer's output, one pass over y on CPU. In training the observer takes the range of
        act(a * y + b) from y's per-channel [min; max] (`channel_extremes`, [2, C]; None in inference) instead
        of a pass over it."""
        if self.training:
            scale, zero_point = self.observer.observe_range(affine_act_range(channel_extremes, a, b, activation))
        else:
            scale, zero_point = self.observer.qparams()
        if self.fake_quant.affine_act_kernel is not None:
            return self.fake_quant.affine_act(y, a, b, activation, scale, zero_point, self.quant_enabled)
        return self.fake_quant(channel_affine_act(y, a, b, activation), scale, zero_point, self.quant_enabled)


def affine_act_range(channel_extremes, a, b, activation):
    """[min, max] of act(a * y + b) over a tensor y whose channel c lies within [channel_extremes[0, c],
    channel_extremes[1, c]]. Exact, not a bound: a product, a sum and a clamp are each monotone in floating point,
    so the extremes of the result are those of the channels' extreme values (for a < 0 the ends swap)."""
    ends = a * channel_extremes + b
    if activation:
        ends = ops.relu6(ends)
    return ops.stack([ops.reduce_min(ends), ops.reduce_max(ends)])


def activation_quantizer(config):
    qmin, qmax = quant_range(config.act_bits, signed=False)
    return Quantizer(qmin, qmax, lambda low, high: MovingAverageMinMaxObserver(low, high, config.ema_decay,
                                                                               config.sync_group))


def weight_quantizer(config, shape, channel_axis=0):
    qmin, qmax = quant_range(config.weight_bits, signed=True, narrow_range=True)
    return Quantizer(qmin, qmax, lambda low, high: PerChannelAbsMaxObserver(low, high, shape, channel_axis),
                     channel_axis % len(shape))
