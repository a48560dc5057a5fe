"""Observers: they track the range of a tensor and turn it into a scale and a zero point.

State lives in Parameters (requires_grad=False) so it is saved in checkpoints and restored exactly. Updates
happen only in training mode and only while `enabled` is 1; freezing an observer sets it to 0.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from src.kernels import UsesKernels, min_max_op, observe_range_op

# The smallest scale allowed: a constant (e.g. all-zero) tensor must not divide by zero.
SCALE_EPS = float(np.finfo(np.float32).eps)


def switch_parameter(name, value):
    return Parameter(Tensor(value, ms.float32), name=name, requires_grad=False)


def asymmetric_qparams(min_val, max_val, qmin, qmax):
    """Scale and integer zero point for [min_val, max_val] widened to hold 0.

    The zero point is rounded (the "nudge" of TF and the original MindSpore suite) so that the real value 0,
    e.g. ReLU outputs and padding, is represented exactly.
    """
    min_val = ops.minimum(min_val, 0.0)
    max_val = ops.maximum(max_val, 0.0)
    scale = ops.maximum((max_val - min_val) / float(qmax - qmin), SCALE_EPS)
    zero_point = ops.clip_by_value(ops.round(qmin - min_val / scale), float(qmin), float(qmax))
    return scale, zero_point


def symmetric_qparams(max_abs, qmax):
    """Scale for [-max_abs, max_abs] with the zero point at 0: max_abs maps to qmax."""
    scale = ops.maximum(max_abs / float(qmax), SCALE_EPS)
    return scale, ops.zeros_like(scale)


class Observer(nn.Cell):
    """Tracks a tensor's range while `enabled` is 1 (a switch Parameter, saved in checkpoints)
    and turns it into a scale and a zero point for the integer range [qmin, qmax], of shape `scale_shape`. The
    schedule switches every Observer of a network at once (src/quant/schedule.py)."""
    scale_shape = ()  # one scale for the tensor

    def __init__(self, qmin, qmax):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.enabled = switch_parameter("enabled", 1.0)


class MovingAverageMinMaxObserver(Observer, UsesKernels):
    """Per-tensor asymmetric range for activations: min/max with an exponential moving average.

    The range is the plain mean of the batches' min/max over the first batches it sees, then an exponential
    moving average once that count reaches the average's horizon, 1 / (1 - ema_decay): the first batch does not
    dominate the first thousand steps, and a calibration over N batches (post-training quantization) weighs them
    all alike. With `sync_group` set (data parallel), every rank takes the min/max over all ranks' batches so all
    ranks keep identical ranges.
    """

    def __init__(self, qmin, qmax, ema_decay=0.999, sync_group=None):
        super().__init__(qmin, qmax)
        self.ema_decay = float(ema_decay)
        self.min_val = Parameter(Tensor(0.0, ms.float32), name="min_val", requires_grad=False)
        self.max_val = Parameter(Tensor(0.0, ms.float32), name="max_val", requires_grad=False)
        self.batches_seen = Parameter(Tensor(0.0, ms.float32), name="batches_seen", requires_grad=False)
        self.all_gather = ops.AllGather(group=sync_group) if sync_group else None
        # One pass instead of two reductions; one operator instead of about forty small ones in the update (the
        # QAT graph's thousands of small nodes cost compile time and step time, measured).
        self.use_kernel("min_max", min_max_op)
        self.use_kernel("range_kernel", observe_range_op)
        self.range_settings = Tensor(np.array([ema_decay, qmin, qmax], np.float32))

    def construct(self, x):
        """(scale, zero_point) of the range, moved first by x's [min, max] in training."""
        if not self.training:
            return self.qparams()
        # The range is not learned; x itself takes no part in it, and its gradient is not touched.
        observed = ops.stop_gradient(x)
        if self.min_max is not None:
            return self.observe_range(self.min_max(observed))
        return self.observe_range(ops.stack([ops.reduce_min(observed), ops.reduce_max(observed)]))

    def observe_range(self, batch):
        """Moves the range by one batch's [min, max] (float32 [2]), when enabled, and returns the new range's
        (scale, zero_point). For callers that know a tensor's range without a pass over it (a quantized layer's
        output: see QuantConvBNAct)."""
        batch = ops.stop_gradient(batch)
        if self.all_gather is not None:
            # CPU collectives only sum; gathering [min, max] from every rank then reducing works everywhere.
            gathered = self.all_gather(batch.reshape(1, 2))
            batch = ops.stack([ops.reduce_min(gathered[:, 0]), ops.reduce_max(gathered[:, 1])])
        if self.range_kernel is not None:
            state = ops.stack([self.min_val, self.max_val, self.batches_seen, self.enabled])
            new = self.range_kernel(batch, state, self.range_settings)
            ops.assign(self.min_val, new[0])
            ops.assign(self.max_val, new[1])
            ops.assign(self.batches_seen, new[2])
            return new[3], new[4]
        # Arithmetic blends instead of branches: the flags are tensors and the graph stays branch-free.
        count = self.batches_seen
        keep = ops.minimum(count / (count + 1.0), self.ema_decay)
        new_min = keep * self.min_val + (1.0 - keep) * batch[0]
        new_max = keep * self.max_val + (1.0 - keep) * batch[1]
        on = self.enabled
        ops.assign(self.min_val, on * new_min + (1.0 - on) * self.min_val)
        ops.assign(self.max_val, on * new_max + (1.0 - on) * self.max_val)
        ops.assign(self.batches_seen, count + on)
        return self.qparams()

    def qparams(self):
        return asymmetric_qparams(self.min_val, self.max_val, self.qmin, self.qmax)


class PerChannelAbsMaxObserver(Observer):
    """Per-channel symmetric range for weights: the absolute maximum of each output channel.

    `channel_axis` names the output-channel axis of the weight layout: 0 for MindSpore's Conv2d (out, in/groups,
    kh, kw), depthwise included (out = in * multiplier, 1, kh, kw), and for Dense (out, in). Layouts that put it
    elsewhere (TF's depthwise (kh, kw, in, multiplier) has it last) pass their own axis.
    Weights change every step, so there is no moving average: the current weights set the range, in training and
    in evaluation alike (a float checkpoint just loaded is evaluated with its own ranges), until frozen.
    """

    def __init__(self, qmin, qmax, shape, channel_axis=0):
        super().__init__(qmin, qmax)
        ndim = len(shape)
        channel_axis = channel_axis % ndim
        self.reduce_axes = tuple(a for a in range(ndim) if a != channel_axis)
        self.scale_shape = tuple(shape[a] if a == channel_axis else 1 for a in range(ndim))
        self.max_abs = Parameter(Tensor(np.zeros(self.scale_shape, np.float32)), name="max_abs",
                                 requires_grad=False)

    def construct(self, w):
        """(scale, zero_point) per channel of the range, set first by w's own while enabled."""
        current = ops.amax(ops.abs(ops.stop_gradient(w)), self.reduce_axes, keepdims=True)
        on = self.enabled
        ops.assign(self.max_abs, on * current + (1.0 - on) * self.max_abs)
        return self.qparams()

    def qparams(self):
        return symmetric_qparams(self.max_abs, self.qmax)
