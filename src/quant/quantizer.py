"""A quantizer is an observer plus the fake-quantizer that rounds with the observer's range (`Quantizer`), or
with a step size learned from the observer's range on (`LearnedStepQuantizer`, LSQ).

`QuantConfig` says how many bits (and where), how ranges are tracked and which quantizer; `activation_quantizer` and
`weight_quantizer` build the two kinds the network uses: per-tensor asymmetric unsigned for activations,
per-channel symmetric signed (narrow range) for weights.
"""
import json
import math
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from src.layers import channel_affine_act
from src.quant.fake_quant import FakeQuantize, LearnedStepFakeQuantize, quant_range
from src.quant.integer import ACTIVATION_CODES
from src.quant.observers import MovingAverageMinMaxObserver, PerChannelAbsMaxObserver, SCALE_EPS, switch_parameter


@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8
    act_bits: int = 8
    # The activations at the network's edges, its input (the pixels), the classifier's input and the logits, take
    # these bits whatever act_bits says: the convention of low-bit results (LSQ, AdaRound, BRECQ keep the first
    # and last layers at 8 bits).
    edge_act_bits: int = 8
    ema_decay: float = 0.999
    # "minmax": scales from the observed ranges throughout; "lsq": from the observed ranges until the observers
    # freeze, then learned (LearnedStepQuantizer).
    quantizer: str = "minmax"
    # A mixed-precision plan: ((layer name, weight bits), ...) for the layers whose weights take other bits than
    # weight_bits (src/quant/bits_plan.py).
    layer_weight_bits: tuple = ()
    # Communication group over which activation ranges are agreed in data-parallel training (None: no sync).
    sync_group: Optional[str] = None

    # What a quantized checkpoint records of its network's quantization (src/checkpoint.py) and a resume must
    # match: the stored ranges mean nothing at other bits, and LSQ's step sizes are Parameters a minmax network
    # does not have. The others are how a run trains.
    RECORDED = ("weight_bits", "act_bits", "edge_act_bits", "layer_weight_bits", "quantizer")
    BIT_WIDTHS = ("weight_bits", "act_bits", "edge_act_bits")

    @classmethod
    def from_config(cls, config, sync_group=None):
        """The QuantConfig of a run's config (src/config.py), whose keys are named as the fields are."""
        values = {field.name: config[field.name] for field in fields(cls) if field.name in config}
        values["layer_weight_bits"] = tuple(sorted(values["layer_weight_bits"].items()))
        return cls(**dict(values, sync_group=sync_group))

    def record(self):
        """The RECORDED fields as a checkpoint stores them (the mixed-precision plan as JSON)."""
        record = {key: getattr(self, key) for key in self.RECORDED}
        record["layer_weight_bits"] = json.dumps(dict(self.layer_weight_bits), sort_keys=True)
        return record


class Quantizer(nn.Cell):
    """Observes x, then fake-quantizes it with the observed range while `quant_enabled` is 1. The integer range
    [qmin, qmax] is decided here and handed to the observer (`make_observer(qmin, qmax)`) and the fake-quantizer;
    `channel_axis` is the axis of the observer's per-channel ranges (None: one range for the tensor)."""

    fake_quant_class = FakeQuantize

    def __init__(self, qmin, qmax, make_observer, channel_axis=None):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.observer = make_observer(qmin, qmax)
        self.fake_quant = self.fake_quant_class(qmin, qmax, channel_axis)
        self.quant_enabled = switch_parameter("quant_enabled", 1.0)

    def construct(self, x):
        return self.fake_quantize(x)[0]

    def fake_quantize(self, x):
        """(x fake-quantized, its scale)."""
        scale, zero_point = self.observe(x)
        return self.fake_quant(x, scale, zero_point, self.quant_enabled), scale

    def observe(self, x):
        """(scale, zero_point) for x, the observer moved first by x (in training, or for weights, while enabled)."""
        return self.observer(x)

    def qparams(self):
        """(scale, zero_point) as they stand: what integer inference and the exported model use."""
        return self.observer.qparams()

    @property
    def code_bits(self):
        """Bits a packed storage of the codes needs: [qmin, qmax] holds qmax - qmin + 1 values."""
        return math.ceil(math.log2(self.qmax - self.qmin + 1))

    def grid_distance(self, x):
        """Sum of squared distances, in steps of the scale, from x clamped to the range to its quantized values,
        which are held constant like the scale: oscillation dampening's penalty (Nagel et al. 2022), whose gradient
        pulls each value toward the grid point it rounds to. In steps, not in x's units, so that the pull on a
        BN-folded weight does not grow with its channel's fold factor gamma / sigma. 0 while rounding is off."""
        scale, zero_point = self.observe(x)
        scale, zero_point = ops.stop_gradient(scale), ops.stop_gradient(zero_point)
        target = ops.stop_gradient((self.fake_quant.quantize(x, scale, zero_point) - zero_point) * scale)
        clamped = ops.clip_by_value(x, (self.qmin - zero_point) * scale, (self.qmax - zero_point) * scale)
        return ops.reduce_sum(ops.square((clamped - target) / scale)) * self.quant_enabled

    def code_bounds(self, scale, zero_point, relu6=False):
        """[lowest, highest] code of the tensor quantized with (scale, zero_point), as training's rounding clamps
        it: [qmin, qmax], within which ReLU6 before the quantizer (`relu6`) keeps codes from the code of 0 to the
        code of 6 (clamping codes is clamping values: rounding is monotone). Deployed, codes are uint8, [0, 255]:
        where these bounds are narrower (fewer than 8 bits, or 6 below the range's top) the codes are clamped to
        them (the Requantize CPU kernel, `clamp_codes` on MindSpore ops, and an integer Clip in the ONNX model)."""
        lowest, highest = float(self.qmin), float(self.qmax)
        if not relu6:
            return lowest, highest
        return ops.maximum(zero_point, lowest), ops.minimum(ops.round(6.0 / scale) + zero_point, highest)

    def clamp_codes(self, quantized, relu6=False):
        """A quantized activation (codes, scale, zero point) with its codes clamped to `code_bounds`."""
        codes, scale, zero_point = quantized
        if not relu6 and (self.qmin, self.qmax) == (0, ACTIVATION_CODES):
            return quantized  # the codes are uint8 already
        lowest, highest = self.code_bounds(scale, zero_point, relu6)
        return ops.clip_by_value(codes, lowest, highest), scale, zero_point

    def requantize_settings(self, scale, zero_point, relu6=False):
        """[zero point, lowest code, highest code] for codes quantized with (scale, zero_point): what the
        Requantize CPU kernel takes to write them clamped to `code_bounds` in its one pass."""
        zero = zero_point.reshape(1)
        lowest, highest = self.code_bounds(scale, zero_point, relu6)
        return ops.concat((zero, zero * 0 + lowest, zero * 0 + highest))  # each bound as a (1,) tensor

    def codes(self, x):
        """x as integer codes in [qmin, qmax] (held in float32) and their scale: a weight as the deployed model
        stores it (the observer takes x's own range, unless it is frozen)."""
        scale, zero_point = self.observe(x)
        return self.fake_quant.quantize(x, scale, zero_point), scale

    def affine_act(self, y, a, b, activation, channel_extremes):
        """Quantized act(a * y + b), with a and b per channel of y (N, C, H, W) and act ReLU6 or none: a
        quantized layer's output, one pass over y on CPU. In training the observer takes the range of
        act(a * y + b) from y's per-channel [min; max] (`channel_extremes`, [2, C]; None in inference) instead
        of a pass over it."""
        if self.training:
            scale, zero_point = self.observer.observe_range(affine_act_range(channel_extremes, a, b, activation))
        else:
            scale, zero_point = self.qparams()
        if self.fake_quant.affine_act_kernel is not None:
            return self.fake_quant.affine_act(y, a, b, activation, scale, zero_point, self.quant_enabled)
        return self.fake_quant(channel_affine_act(y, a, b, activation), scale, zero_point, self.quant_enabled)


class LearnedStepQuantizer(Quantizer):
    """LSQ: a Quantizer whose scale, once `learned` is 1, is a trained Parameter, `step_size` (a scalar, or one per
    channel), with LSQ's gradient (LearnedStepFakeQuantize). Until then the observer's range gives the scale, as in
    Quantizer, and `step_size` gets no gradient; `take_over_from_observer` (the schedule calls it when the observers
    freeze) starts it from the observed scale. The zero point stays the frozen observer's. Scales are scales:
    integer inference and export take `qparams` as they take a Quantizer's."""

    fake_quant_class = LearnedStepFakeQuantize

    def __init__(self, qmin, qmax, make_observer, channel_axis=None):
        super().__init__(qmin, qmax, make_observer, channel_axis)
        self.step_size = Parameter(Tensor(np.ones(self.observer.scale_shape, np.float32)), name="step_size")
        self.learned = switch_parameter("learned", 0.0)

    def observe(self, x):
        observed_scale, zero_point = self.observer(x)
        return self._scale(observed_scale), zero_point

    def qparams(self):
        observed_scale, zero_point = self.observer.qparams()
        return self._scale(observed_scale), zero_point

    def _scale(self, observed_scale):
        # A blend, not a branch (the switch is a tensor): exactly one side for `learned` in {0, 1}. The magnitude
        # of the step size: an update that carries it across 0 leaves a scale that still has a gradient (clamped
        # at SCALE_EPS it had none, and the channel stayed quantized to 0 for good).
        learned = self.learned
        return learned * ops.maximum(ops.abs(self.step_size), SCALE_EPS) + (1.0 - learned) * observed_scale

    def affine_act(self, y, a, b, activation, channel_extremes):
        # The scale's gradient needs act(a * y + b) itself: computed with ops, then quantized as any tensor.
        z = channel_affine_act(y, a, b, activation)
        scale, zero_point = self.observe(z)
        return self.fake_quant(z, scale, zero_point, self.quant_enabled)

    def take_over_from_observer(self):
        """Start learning the step size from the observer's current scale (once: a learned one is kept)."""
        if self.learned.asnumpy() == 0:
            self.step_size.set_data(self.observer.qparams()[0].astype(ms.float32))
            self.learned.set_data(Tensor(1.0, ms.float32))


def affine_act_range(channel_extremes, a, b, activation):
    """[min, max] of act(a * y + b) over a tensor y whose channel c lies within [channel_extremes[0, c],
    channel_extremes[1, c]]. Exact, not a bound: a product, a sum and a clamp are each monotone in floating point,
    so the extremes of the result are those of the channels' extreme values (for a < 0 the ends swap)."""
    ends = a * channel_extremes + b
    if activation:
        ends = ops.relu6(ends)
    return ops.stack([ops.reduce_min(ends), ops.reduce_max(ends)])


QUANTIZERS = {"minmax": Quantizer, "lsq": LearnedStepQuantizer}


def _quantizer_class(config):
    if config.quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {config.quantizer!r}")
    return QUANTIZERS[config.quantizer]


def activation_quantizer(config, bits=None):
    """A quantizer of activations at config's act_bits, or at `bits`."""
    qmin, qmax = quant_range(config.act_bits if bits is None else bits, signed=False)
    return _quantizer_class(config)(qmin, qmax, lambda low, high: MovingAverageMinMaxObserver(
        low, high, config.ema_decay, config.sync_group))


def weight_quantizer(config, shape, channel_axis=0):
    qmin, qmax = quant_range(config.weight_bits, signed=True, narrow_range=True)
    return _quantizer_class(config)(qmin, qmax, lambda low, high: PerChannelAbsMaxObserver(
        low, high, shape, channel_axis), channel_axis % len(shape))
