"""A quantizer is an observer plus the fake-quantizer that rounds with the observer's range.

`QuantConfig` says how many bits and how ranges are tracked; `activation_quantizer` and `weight_quantizer` build
the two kinds the network uses: per-tensor asymmetric unsigned for activations, per-channel symmetric signed
(narrow range) for weights.
"""
from dataclasses import dataclass
from typing import Optional

from mindspore import nn

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
    """Observes x, then fake-quantizes it with the observed range while `quant_enabled` is 1."""

    def __init__(self, observer, qmin, qmax, per_tensor):
        super().__init__()
        self.observer = observer
        self.fake_quant = FakeQuantize(qmin, qmax, per_tensor)
        self.quant_enabled = switch_parameter("quant_enabled", 1.0)
        self.qmin, self.qmax = qmin, qmax

    def construct(self, x):
        x = self.observer(x)
        scale, zero_point = self.observer.qparams()
        return self.fake_quant(x, scale, zero_point, self.quant_enabled)


def activation_quantizer(config):
    qmin, qmax = quant_range(config.act_bits, signed=False)
    return Quantizer(MovingAverageMinMaxObserver(qmin, qmax, config.ema_decay, config.sync_group), qmin, qmax,
                     per_tensor=True)


def weight_quantizer(config, shape, channel_axis=0):
    qmin, qmax = quant_range(config.weight_bits, signed=True, narrow_range=True)
    return Quantizer(PerChannelAbsMaxObserver(qmax, shape, channel_axis), qmin, qmax, per_tensor=False)
