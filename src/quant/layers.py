"""Quantization-aware versions of the float blocks in src/layers.py, with the same Parameter names plus their
quantizers' state, and `QuantLayers`, which the network description uses to build them."""
from mindspore import ops
from mindspore.communication import get_group_size

from src.layers import ConvBNAct, Dense, Add, BN_MOMENTUM, values_per_channel
from src.quant.observers import switch_parameter
from src.quant.quantizer import Quantizer, activation_quantizer, weight_quantizer


class QuantConvBNAct(ConvBNAct):
    """Conv + BN (+ ReLU6) with BN folded into the convolution, as integer inference computes it.

    The convolution always runs with the weights folded by the running statistics, W * gamma / sigma_run, and
    fake-quantized per output channel: y = conv(x, Wq). While BN is not frozen, the output is then normalised by
    the batch statistics of conv(x, W) with quantized weights, y / (gamma / sigma_run) (Jacob et al. 2018; PyTorch's
    fused ConvBn does the same), and the running statistics move. Both are an affine map per channel, a * y + b,
    computed from y's channel statistics: one pass over y for the statistics, one for a * y + b, the activation
    and the output's fake quantization (CPU kernels), and only y kept for backward.
    Once `bn_frozen` is 1, a = 1 and b = beta - gamma * mu_run / sigma_run: exactly what the exported model computes.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, activation=True, *,
                 config):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups, activation)
        self.weight_quant = weight_quantizer(config, self.weight.shape, channel_axis=0)
        self.output_quant = activation_quantizer(config)
        self.bn_frozen = switch_parameter("bn_frozen", 0.0)
        self.affine_act = None  # the output quantizer computes act(a * y + b)
        # Data parallel: every rank moves its running statistics by the mean of all ranks' batch statistics, so
        # the folded weights (and the checkpoint rank 0 writes) are the same on every rank.
        if config.sync_group:
            self.stats_all_reduce = ops.AllReduce(group=config.sync_group)
            self.group_size = get_group_size(config.sync_group)

    def fold(self):
        """The folded weight and bias that inference uses (running statistics), before weight quantization."""
        scale, bias = self.running_affine()
        return self.weight * scale.reshape(-1, 1, 1, 1), bias

    def construct(self, x):
        fold_scale, folded_bias = self.running_affine()
        folded_weight = self.weight * fold_scale.reshape(-1, 1, 1, 1)
        y = self.low_precision(self.conv, x, self.weight_quant(folded_weight))
        if not self.training:
            return self.output_quant.affine_act(y, ops.ones_like(folded_bias), folded_bias, self.activation, None)
        stats = self.channel_stats(y)
        # BN in training mode on conv(x, Wq) = y / fold_scale, its statistics derived from y's; then, per channel,
        # a blend with the frozen layer's (1, folded_bias) instead of a branch of the graph (the switch is a tensor;
        # branches made the graph compile more slowly): with the switch in {0, 1} each side is exact, and a frozen
        # layer's running statistics move by 0.
        frozen = self.bn_frozen
        a, b = self.batch_norm_affine(stats[0] / fold_scale, stats[1] / (fold_scale * fold_scale),
                                      values_per_channel(y), BN_MOMENTUM * (1.0 - frozen))
        a = frozen + (1.0 - frozen) * (a / fold_scale)
        b = frozen * folded_bias + (1.0 - frozen) * b
        return self.output_quant.affine_act(y, a, b, self.activation, stats[2:])


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
