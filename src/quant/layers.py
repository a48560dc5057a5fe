"""Quantization-aware versions of the float blocks in src/layers.py, with the same Parameter names plus their
quantizers' state, and `QuantLayers`, which the network description uses to build them."""
from mindspore import ops
from mindspore.communication import get_group_size

from src.layers import ConvBNAct, Dense, Add, BN_MOMENTUM, BN_EPS
from src.quant.observers import switch_parameter
from src.quant.quantizer import Quantizer, activation_quantizer, weight_quantizer


class QuantConvBNAct(ConvBNAct):
    """Conv + BN (+ ReLU6) with BN folded into the convolution, as integer inference computes it.

    The convolution always runs with the weights folded by the running statistics, W * gamma / sigma_run, and
    fake-quantized per output channel. While BN is not frozen, the output is then corrected to batch
    statistics (Jacob et al. 2018; PyTorch's fused ConvBn does the same): the folded convolution's output is
    divided by the fold scale gamma / sigma_run, which gives conv(x, W) with quantized weights, and a BatchNorm
    in training mode normalises it with its batch statistics and moves the running ones. One convolution, and
    the backend's BatchNorm kernel computes the statistics (on CPU about 7x faster than the reductions written
    out as ops, measured).
    Once `bn_frozen` is 1 the output is y + beta - gamma * mu_run / sigma_run: exactly what the exported model
    computes.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, activation=True, *,
                 config):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups, activation)
        self.weight_quant = weight_quantizer(config, self.weight.shape, channel_axis=0)
        self.output_quant = activation_quantizer(config)
        self.bn_frozen = switch_parameter("bn_frozen", 0.0)
        # Data parallel: every rank moves its running statistics by the mean of all ranks' batch statistics, so
        # the folded weights (and the checkpoint rank 0 writes) are the same on every rank.
        self.stats_all_reduce = ops.AllReduce(group=config.sync_group) if config.sync_group else None
        self.group_size = get_group_size(config.sync_group) if config.sync_group else 1
        self.batch_norm_train = ops.BatchNorm(is_training=True, epsilon=BN_EPS, momentum=BN_MOMENTUM)

    def _fold_scale(self):
        return self.gamma / ops.sqrt(self.moving_variance + BN_EPS)

    def fold(self):
        """The folded weight and bias that inference uses (running statistics), before weight quantization."""
        scale = self._fold_scale()
        return self.weight * scale.reshape(-1, 1, 1, 1), self.beta - scale * self.moving_mean

    def construct(self, x):
        folded_weight, folded_bias = self.fold()
        y = self.low_precision(self.conv, x, self.weight_quant(folded_weight))
        # A branch, not a blend: batch statistics cost a pass over y, and a frozen layer must not move them.
        if self.training and self.bn_frozen < 0.5:
            y = self._batch_norm(y / self._fold_scale().reshape(1, -1, 1, 1))
        else:
            y = y + folded_bias.reshape(1, -1, 1, 1)
        if self.activation:
            y = ops.relu6(y)
        return self.output_quant(y)

    def _batch_norm(self, conv_output):
        if self.stats_all_reduce is None:
            return ops.batch_norm(conv_output, self.moving_mean, self.moving_variance, self.gamma, self.beta, True,
                                  BN_MOMENTUM, BN_EPS)
        # Data parallel: normalise by this rank's batch statistics, move the running ones by the mean of all
        # ranks'. The kernel's in-place update goes to throwaway tensors (read back after it, the Parameters were
        # not reliably updated yet once gradients flowed: ranks drifted apart); its batch mean and biased
        # variance come out as data, and the update below depends on them.
        y, _, _, batch_mean, batch_variance = self.batch_norm_train(
            conv_output, self.gamma, self.beta, ops.zeros_like(self.moving_mean), ops.ones_like(self.moving_variance))
        count = conv_output.shape[0] * conv_output.shape[2] * conv_output.shape[3]
        stats = ops.stop_gradient(ops.stack([batch_mean, batch_variance * (count / (count - 1))]))  # unbiased, as BN
        stats = self.stats_all_reduce(stats) / self.group_size
        ops.assign(self.moving_mean, (1 - BN_MOMENTUM) * self.moving_mean + BN_MOMENTUM * stats[0])
        ops.assign(self.moving_variance, (1 - BN_MOMENTUM) * self.moving_variance + BN_MOMENTUM * stats[1])
        return y


class QuantDense(Dense):
    """Dense with per-output-channel fake-quantized weights and a quantized output."""

    def __init__(self, in_channels, out_channels, *, config):
        super().__init__(in_channels, out_channels)
        self.weight_quant = weight_quantizer(config, self.weight.shape, channel_axis=0)
        self.output_quant = activation_quantizer(config)

    def construct(self, x):
        return self.output_quant(self.low_precision(self.matmul, x, self.weight_quant(self.weight)) + self.bias)


class QuantAdd(Add):
    """Residual add whose sum is quantized, as an integer add requantizes its output."""

    def __init__(self, *, config):
        super().__init__()
        self.output_quant = activation_quantizer(config)

    def construct(self, x, y):
        return self.output_quant(x + y)


class QuantLayers:
    """Builds the quantization-aware version of each kind of layer the network description asks for."""
    quantized = True

    def __init__(self, config):
        self.config = config

    def conv_bn_act(self, *args, **kwargs):
        return QuantConvBNAct(*args, config=self.config, **kwargs)

    def dense(self, *args):
        return QuantDense(*args, config=self.config)

    def add(self):
        return QuantAdd(config=self.config)

    def activation_quant(self):
        return activation_quantizer(self.config)


def quant_state_names(network):
    """Names of the Parameters quantization adds to a network: quantizer state and the BN-freeze switches.
    A float checkpoint has none of them; a quantized one must have them all."""
    names = []
    for _, cell in network.cells_and_names():
        if isinstance(cell, Quantizer):
            names += [param.name for param in cell.get_parameters()]
        elif isinstance(cell, QuantConvBNAct):
            names.append(cell.bn_frozen.name)
    return names
