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
    statistics (Jacob et al. 2018): y * sigma_run / sigma_B + beta - gamma * mu_B / sigma_B, with mu_B and
    sigma_B measured on the folded convolution's output (one convolution, not two), and the running statistics
    are updated. Once `bn_frozen` is 1 the output is y + beta - gamma * mu_run / sigma_run: exactly what the
    exported model computes.
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

    def _running_std_and_scale(self):
        running_std = ops.sqrt(self.moving_variance + BN_EPS)
        return running_std, self.gamma / running_std

    def fold(self):
        """The folded weight and bias that inference uses (running statistics), before weight quantization."""
        _, scale = self._running_std_and_scale()
        return self.weight * scale.reshape(-1, 1, 1, 1), self.beta - scale * self.moving_mean

    def construct(self, x):
        folded_weight, folded_bias = self.fold()
        y = self.low_precision(self.conv, x, self.weight_quant(folded_weight))
        if self.training:
            multiplier, bias = self._batch_statistics_correction(y, folded_bias)
            y = y * multiplier.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
        else:
            y = y + folded_bias.reshape(1, -1, 1, 1)
        if self.activation:
            y = ops.relu6(y)
        return self.output_quant(y)

    def _batch_statistics_correction(self, y, folded_bias):
        running_std, scale = self._running_std_and_scale()
        # y = scale * conv(x, W): statistics of conv(x, W) are those of y divided by scale.
        y_mean = ops.mean(y, (0, 2, 3))
        y_var = ops.mean(ops.square(y - y_mean.reshape(1, -1, 1, 1)), (0, 2, 3))
        batch_mean = y_mean / scale
        batch_var = y_var / ops.square(scale)
        batch_std = ops.sqrt(batch_var + BN_EPS)
        frozen = self.bn_frozen
        multiplier = frozen + (1.0 - frozen) * (running_std / batch_std)
        bias = frozen * folded_bias + (1.0 - frozen) * (self.beta - self.gamma * batch_mean / batch_std)
        # Running statistics move only while BN is not frozen (unbiased variance, as BatchNorm does).
        count = y.size // y.shape[1]
        stats = ops.stop_gradient(ops.stack([batch_mean, batch_var * (count / max(count - 1, 1))]))
        if self.stats_all_reduce is not None:
            stats = self.stats_all_reduce(stats) / self.group_size  # CPU collectives only sum
        rate = (1.0 - frozen) * BN_MOMENTUM
        ops.assign(self.moving_mean, self.moving_mean + rate * (stats[0] - self.moving_mean))
        ops.assign(self.moving_variance, self.moving_variance + rate * (stats[1] - self.moving_variance))
        return multiplier, bias


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
