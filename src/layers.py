"""Float building blocks of the network. The quantized ones (src/quant/layers.py) extend them, keeping the same
Parameter names, so a float checkpoint loads into a quantized network by name."""

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, HeNormal, Normal

from src.kernels import AffineAct, DirectConv2D, UsesKernels, channel_stats_op, stock_convolution

BN_MOMENTUM = 0.1  # weight of the new batch in the running statistics (PyTorch's convention, as ops.batch_norm)
BN_EPS = 1e-5


class _MixedPrecision:
    """`compute_dtype` float16 runs the convolution or matrix multiply in FP16 on FP16 copies of its input and
    (FP32 master) weights, and casts the result back to FP32: BN, fake quantization and observers stay FP32."""
    compute_dtype = ms.float32

    def low_precision(self, op, x, weight):
        if self.compute_dtype == ms.float32:
            return op(x, weight)
        return op(x.astype(self.compute_dtype), weight.astype(self.compute_dtype)).astype(ms.float32)


def set_compute_dtype(network, dtype):
    """Mixed precision for every convolution and dense layer of `network` (float16), or none (float32)."""
    for _, cell in network.cells_and_names():
        if isinstance(cell, _MixedPrecision):
            cell.compute_dtype = dtype


class ConvBNAct(nn.Cell, _MixedPrecision, UsesKernels):
    """Conv2d (no bias) + BatchNorm + optional ReLU6, with 'same' padding for odd kernels.

    BN is an affine map per channel, a * y + b on the convolution's output y: from y's batch statistics in training
    (which move the running ones), from the running statistics in inference. On CPU one kernel pass computes y's
    channel statistics and another act(a * y + b), keeping only y for backward (MindSpore's BatchNorm and ReLU6
    took twice as long, measured); elsewhere the same arithmetic runs as MindSpore ops.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, activation=True):
        super().__init__()
        padding = (kernel_size - 1) // 2
        weight_shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weight = Parameter(initializer(HeNormal(mode="fan_out", nonlinearity="relu"), weight_shape,
                                            ms.float32), name="weight")
        self.gamma = Parameter(initializer("ones", (out_channels,), ms.float32), name="gamma")
        self.beta = Parameter(initializer("zeros", (out_channels,), ms.float32), name="beta")
        self.moving_mean = Parameter(initializer("zeros", (out_channels,), ms.float32), name="moving_mean",
                                     requires_grad=False)
        self.moving_variance = Parameter(initializer("ones", (out_channels,), ms.float32),
                                         name="moving_variance", requires_grad=False)
        self.activation = activation
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        # Our direct convolution where oneDNN would run its reference one (larger than 1x1), MindSpore's Conv2D else.
        self.use_kernel("conv", lambda library: DirectConv2D(library, stride, padding),
                        stock_convolution(out_channels, kernel_size, stride, padding, groups),
                        available=kernel_size > 1)
        self.use_kernel("channel_stats", channel_stats_op, channel_stats)
        self.use_kernel("affine_act", lambda library: AffineAct(library, activation))
        # Data parallel (the quantized layer): averages the batch statistics over ranks before they move the
        # running ones. None: each rank moves its own, as BN without SyncBN does.
        self.stats_all_reduce, self.group_size = None, 1

    def construct(self, x):
        y = self.low_precision(self.conv, x, self.weight)
        if self.training:
            stats = self.channel_stats(y)
            a, b = self.batch_norm_affine(stats[0], stats[1], values_per_channel(y))
        else:
            a, b = self.running_affine()
        if self.affine_act is not None:
            return self.affine_act(y, a, b)
        return channel_affine_act(y, a, b, self.activation)

    def running_affine(self):
        """(a, b) per channel with a * y + b = BN(y) by the running statistics: gamma / sigma_run and
        beta - gamma * mu_run / sigma_run (the fold of the quantized layer)."""
        a = self.gamma / ops.sqrt(self.moving_variance + BN_EPS)
        return a, self.beta - a * self.moving_mean

    def batch_norm_affine(self, mean, variance, count, momentum=BN_MOMENTUM):
        """(a, b) per channel with a * y + b = BN(y) in training mode, for y whose channels have these batch
        statistics (biased variance, over `count` values each); moves the running statistics by `momentum`."""
        a = self.gamma / ops.sqrt(variance + BN_EPS)
        # The running variance is unbiased, as BN's; max() keeps a batch of one value from dividing by zero.
        batch = ops.stop_gradient(ops.stack([mean, variance * (count / max(count - 1, 1))]))
        if self.stats_all_reduce is not None:
            batch = self.stats_all_reduce(batch) / self.group_size
        ops.assign(self.moving_mean, self.moving_mean + momentum * (batch[0] - self.moving_mean))
        ops.assign(self.moving_variance, self.moving_variance + momentum * (batch[1] - self.moving_variance))
        return a, self.beta - a * mean


def values_per_channel(y):
    """How many values each channel of y (N, C, H, W) holds: what its batch statistics are taken over."""
    return y.shape[0] * y.shape[2] * y.shape[3]


def channel_stats(y):
    """[4, C]: mean, biased variance, min and max of each channel of y (N, C, H, W), as MindSpore ops (the CPU
    kernel does it in one pass); the min and max take no gradient (they feed observers)."""
    axes = (0, 2, 3)
    mean = ops.mean(y, axes)
    variance = ops.mean(ops.square(y - mean.reshape(1, -1, 1, 1)), axes)
    extremes = ops.stop_gradient(ops.stack([ops.amin(y, axes), ops.amax(y, axes)]))
    return ops.concat((ops.stack([mean, variance]), extremes))


def channel_affine_act(y, a, b, activation):
    """act(a * y + b) with a and b per channel of y (N, C, H, W), act ReLU6 or none, as MindSpore ops."""
    v = a.reshape(1, -1, 1, 1) * y + b.reshape(1, -1, 1, 1)
    return ops.relu6(v) if activation else v


class Dense(nn.Cell, _MixedPrecision):
    """y = x W^T + b."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.01), (out_channels, in_channels), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), ms.float32), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        return self.low_precision(self.matmul, x, self.weight) + self.bias


class Add(nn.Cell):
    def construct(self, x, y):
        return x + y


class GlobalAveragePool(nn.Cell):
    """(N, C, H, W) -> (N, C): each channel's mean."""

    def construct(self, x):
        return ops.mean(x, (2, 3))


class FloatLayers:
    """Builds the float version of each kind of layer the network description asks for."""
    quantized = False
    conv_bn_act = ConvBNAct
    dense = Dense
    add = Add

    @staticmethod
    def edge_activation_quant():
        return nn.Identity()

    @staticmethod
    def quantize_input(output_quant):
        return nn.Identity()

    @staticmethod
    def global_average_pool(output_quant):
        return GlobalAveragePool()


def make_divisible(value, divisor=8):
    """Round a channel count to a multiple of divisor, never below 90% of it (as the reference MobileNetV2)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


