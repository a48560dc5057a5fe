"""The fake-quantizers: quantize, clamp, dequantize, with a clipped straight-through gradient for x, and for the
scale none (`FakeQuantize`: ranges from min/max observers) or LSQ's (`LearnedStepFakeQuantize`: learned scales).

They hold no range of their own: the scale and zero point come from the quantizer (quantizer.py), so rounding and
range tracking can be tested and changed apart. Built from ordinary MindSpore ops so it runs in GRAPH mode on
CPU, GPU and Ascend alike (the fused FakeQuantPerLayer primitives have no CPU kernel).
"""
import numpy as np
from mindspore import nn, ops, Tensor

from src.kernels import UsesKernels, activation_bounds, affine_act_fake_quant_op, fake_quant_ops

# The bit widths a quantizer can take: codes of every width fit the deployed model's 8-bit tensors.
MIN_BITS, MAX_BITS = 2, 8


def quant_range(num_bits, signed, narrow_range=False):
    """The integer range [qmin, qmax] of a `num_bits` quantized value.

    narrow_range drops the most negative (signed) or the lowest (unsigned) code, e.g. int8 [-127, 127], which
    makes a symmetric range exactly symmetric.
    """
    if not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be between {MIN_BITS} and {MAX_BITS}, got {num_bits}")
    if signed:
        qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** num_bits - 1
    if narrow_range:
        qmin += 1
    return qmin, qmax


def fake_quant_bias(bias, bias_scale, enabled):
    """The bias as the deployed model adds it, int32 codes at `bias_scale` (the input's scale times the weights'):
    round(bias / bias_scale) * bias_scale, with a straight-through gradient; the bias itself while `enabled` is 0.
    At 4-bit inputs and weights bias_scale is a large part of an output step: the unrounded bias flipped 1-3% of a
    layer's output codes against the deployed model's, and the flips compounded to half the codes mid-network."""
    rounded = ops.round(bias / bias_scale) * bias_scale
    return bias + ops.stop_gradient(rounded - bias) * enabled


class FakeQuantize(nn.Cell, UsesKernels):
    """y = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale where enabled, else y = x.

    `scale` and `zero_point` broadcast against x (a scalar per tensor, or a per-channel shape); `enabled` is a
    0/1 float scalar so the quantization delay can switch rounding on without recompiling the graph.
    Rounding is half to even, as ONNX QuantizeLinear does, so training and the exported model round alike.

    The gradient is straight-through inside the clamped range and zero outside it; scale and zero point get
    none (they come from min/max observers, not from learning). A custom bprop keeps only x for backward.

    `channel_axis` None (scalar scale and zero point: activations) or 0 (one per index of the first axis: weights)
    lets the CPU use the one-pass kernels of src/kernels, which give the same bits as the ops below; other axes
    run as ops. `affine_act` is the one-pass output of a quantized layer (per tensor).
    """

    def __init__(self, qmin, qmax, channel_axis=None):
        super().__init__()
        self.qmin = float(qmin)
        self.qmax = float(qmax)
        self.use_kernel("kernels", fake_quant_ops, available=channel_axis in (None, 0))
        self.use_kernel("affine_act_kernel", affine_act_fake_quant_op, available=channel_axis is None)
        self.qrange = Tensor(np.array([qmin, qmax], np.float32))
        self.relu6_range, self.no_act_range = Tensor(activation_bounds(True)), Tensor(activation_bounds(False))

    # The switch `enabled` is arithmetic, not a branch: ~110 tensor-valued branches with their gradients made
    # the QAT training graph compile about twice as slowly (measured, 197 s against 107 s at width 0.25). With e
    # in {0, 1}, dq * e + x * (1 - e) is exactly dq or exactly x; the kernels take e as an input instead.

    def construct(self, x, scale, zero_point, enabled):
        if self.kernels is not None:
            return self.kernels[0](x, scale.reshape(-1), zero_point.reshape(-1), self._settings(enabled))
        q = self.quantize(x, scale, zero_point)
        return (q - zero_point) * scale * enabled + x * (1.0 - enabled)

    def quantize(self, x, scale, zero_point):
        """x's integer codes (held in float32): clamp(round(x / scale) + zero_point, qmin, qmax)."""
        return ops.clip_by_value(ops.round(x / scale) + zero_point, self.qmin, self.qmax)

    def bprop(self, x, scale, zero_point, enabled, out, dout):
        no_grads = ops.zeros_like(scale), ops.zeros_like(zero_point), ops.zeros_like(enabled)
        if self.kernels is not None:
            return (self.kernels[1](dout, x, scale.reshape(-1), zero_point.reshape(-1), self._settings(enabled)),) \
                + no_grads
        # In range exactly where the forward clamp left the rounded value alone; everywhere when disabled.
        q = ops.round(x / scale) + zero_point
        passes = ops.logical_and(q >= self.qmin, q <= self.qmax).astype(dout.dtype)
        return (dout * (passes * enabled + (1.0 - enabled)),) + no_grads

    def affine_act(self, y, a, b, activation, scale, zero_point, enabled):
        """The affine_act_kernel: fake-quantized act(a * y + b), a and b per channel of y (N, C, H, W), act ReLU6
        (`activation`) or none, in one pass that keeps only y for backward. Without it the quantizer calls this
        cell on act(a * y + b) computed with ops: the same bits."""
        act_range = self.relu6_range if activation else self.no_act_range
        settings = ops.concat((self._settings(enabled), act_range))
        return self.affine_act_kernel(y, a, b, scale.reshape(1), zero_point.reshape(1), settings)

    def _settings(self, enabled):
        return ops.concat((self.qrange, enabled.reshape(1)))


class LearnedStepFakeQuantize(FakeQuantize):
    """FakeQuantize with a gradient for the scale too: the step size of LSQ (Esser et al. 2020, "Learned Step Size
    Quantization"). With v = x / scale, the output (clamp(round(v) + zp, qmin, qmax) - zp) * scale has the
    straight-through derivative round(v) - v inside the range, qmin - zp or qmax - zp where clamped; LSQ scales the
    scale's gradient by 1 / sqrt(n * qmax), n the number of values sharing one scale in one example (a weight
    channel's values; an activation's values per image: the loss is a mean over the batch, so the gradient sums
    one image's worth), so that step sizes learn at the pace of the weights. The gradient for x is FakeQuantize's;
    the zero point gets none (it stays where the observer left it). Ops only: the scale's gradient needs x / scale,
    which the CPU kernels do not keep.
    `scale` is a scalar (per tensor) or has x's rank with 1 on every axis but the channels' (per channel).
    """

    def __init__(self, qmin, qmax, channel_axis=None):
        super().__init__(qmin, qmax, channel_axis)
        self.use_mindspore_ops()

    def bprop(self, x, scale, zero_point, enabled, out, dout):
        v = x / scale
        q = ops.round(v) + zero_point
        below = (q < self.qmin).astype(dout.dtype)
        above = (q > self.qmax).astype(dout.dtype)
        inside = 1.0 - below - above
        dx = dout * (inside * enabled + (1.0 - enabled))
        dq_dscale = inside * (ops.round(v) - v) + below * (self.qmin - zero_point) + above * (self.qmax - zero_point)
        per_channel = scale.ndim > 0
        axes = tuple([a for a in range(x.ndim) if not per_channel or scale.shape[a] == 1])
        dscale = ops.reduce_sum(dout * dq_dscale, axes).reshape(scale.shape)
        shared = x.size // scale.size if per_channel else x.size // x.shape[0]
        dscale = dscale * enabled * (shared * self.qmax) ** -0.5
        return dx, dscale, ops.zeros_like(zero_point), ops.zeros_like(enabled)
