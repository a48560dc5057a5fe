"""Float building blocks of the network. The quantized ones (src/quant/layers.py) extend them, keeping the same
Parameter names, so a float checkpoint loads into a quantized network by name."""

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, HeNormal, Normal

from src.kernels import convolution, stock_convolution

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


class ConvBNAct(nn.Cell, _MixedPrecision):
    """Conv2d (no bias) + BatchNorm + optional ReLU6, with 'same' padding for odd kernels."""

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
        self.conv = convolution(out_channels, kernel_size, stride, padding, groups)
        self.activation = activation
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups

    def use_mindspore_ops(self):
        self.conv = stock_convolution(self.out_channels, self.kernel_size, self.stride, self.padding, self.groups)

    def construct(self, x):
        y = ops.batch_norm(self.low_precision(self.conv, x, self.weight), self.moving_mean, self.moving_variance,
                           self.gamma, self.beta, self.training, BN_MOMENTUM, BN_EPS)
        return ops.relu6(y) if self.activation else y


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


class FloatLayers:
    """Builds the float version of each kind of layer the network description asks for."""
    quantized = False
    conv_bn_act = ConvBNAct
    dense = Dense
    add = Add

    @staticmethod
    def activation_quant():
        return nn.Identity()


def make_divisible(value, divisor=8):
    """Round a channel count to a multiple of divisor, never below 90% of it (as the reference MobileNetV2)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


