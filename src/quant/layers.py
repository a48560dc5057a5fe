"""Quantization-aware versions of the float blocks in src/layers.py, with the same Parameter names plus their
quantizers' state, and `QuantLayers`, which the network description uses to build them.

In training each layer fake-quantizes (float arithmetic, straight-through gradients). In inference it lowers
itself (`lower`) to its deployment target's arithmetic (src/targets): it computes what the exported INT8 model
computes, on activations that travel as (codes, scale, zero_point). `set_integer_inference(network, False)` brings
back fake quantization in inference, which lets the rounding of single tensors be switched (quantization
sensitivity).
"""
from dataclasses import replace

from mindspore import nn, ops
from mindspore.communication import get_group_size

from src.kernels import UsesKernels, qlinear_add_op, requantize_op
from src.layers import ConvBNAct, Dense, Add, BN_MOMENTUM, values_per_channel
from src.quant import integer
from src.quant.bits_plan import BitsPlanError
from src.quant.fake_quant import fake_quant_bias
from src.quant.observers import switch_parameter
from src.quant.quantizer import Quantizer, activation_quantizer, weight_quantizer
from src.targets import DEFAULT_TARGET


class _Deployed:
    """A layer of the deployed model. In inference, while `integer_inference` is on, it computes its `lower` with
    its deployment target's arithmetic."""
    integer_inference = True
    deployment_target = DEFAULT_TARGET


class _IntegerLayer(_Deployed, UsesKernels):
    """What a quantized convolution or dense layer deploys as: int8 weight codes, int32 bias, requantization."""
    # The quantizer of this layer's input, in a tuple: a reference, not a sub-cell (its Parameters keep their names);
    # set from the network's dataflow (src/quant/dataflow.py).
    input_quantizer = ()

    def _init_weight_quant(self, config, fan_in):
        """The weight quantizer at config's weight_bits, and how the integer product of `fan_in` terms is taken."""
        self.quant_config, self.fan_in = config, fan_in
        self.weight_quant = weight_quantizer(config, self.weight.shape, channel_axis=0)
        # Wide layers whose products could leave float32's exact integers are computed digit by digit.
        self.weight_digits = integer.needs_weight_digits(fan_in, self.weight_quant.qmax)
        self.use_kernel("requantize_kernel", requantize_op, available=not self.weight_digits)

    def set_weight_bits(self, bits):
        """Quantize this layer's weights at `bits` instead of the config's weight_bits (a new, unobserved
        weight quantizer: call before training or loading)."""
        self._init_weight_quant(replace(self.quant_config, weight_bits=bits), self.fan_in)

    def input_scale(self):
        """The scale of this layer's input: its input quantizer's."""
        return self.input_quantizer[0].qparams()[0]

    def deployed_bias(self, bias, weight_scale):
        """`bias` rounded as the deployed model's int32 bias is, at the input's scale times `weight_scale` (the
        weights' per-output-channel scale): training and simulated inference add the bias integer inference adds.
        A layer built outside a network has no input quantizer, and adds `bias` as it is."""
        if not self.input_quantizer:
            return bias
        return fake_quant_bias(bias, self.input_scale() * weight_scale.reshape(-1), self.weight_quant.quant_enabled)

    def latent_weight(self):
        """The float weight the weight quantizer rounds (the first of the layer's `float_weights`)."""
        return self.float_weights()[0]

    def deployed_weights(self, input_scale):
        """Weight codes (as floats), their per-output-channel scales and the int32 bias codes for an input of
        scale `input_scale`, from the layer's `float_weights`: the constants of the exported model."""
        weight, bias = self.float_weights()
        codes, scale = self.weight_quant.codes(weight)
        scale = scale.reshape(-1)
        return codes, scale, integer.bias_codes(bias, input_scale * scale)


class QuantConvBNAct(ConvBNAct, _IntegerLayer):
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
        self._init_weight_quant(config, in_channels // groups * kernel_size * kernel_size)
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

    def float_weights(self):
        """The weight and bias that inference quantizes: the BN-folded ones."""
        return self.fold()

    def construct(self, x):
        if not self.training and self.integer_inference:
            return self.lower(self.deployment_target.arithmetic, x)
        fold_scale, folded_bias = self.running_affine()
        weight, weight_scale = self.weight_quant.fake_quantize(self.weight * fold_scale.reshape(-1, 1, 1, 1))
        y = self.low_precision(self.conv, x, weight)
        folded_bias = self.deployed_bias(folded_bias, weight_scale)
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

    def lower(self, target, x):
        """This layer as `target` deploys it (src/quant/dataflow.py): a convolution of x's codes with
        `deployed_weights`, ReLU6 (`activation`) as a clamp of the output codes, requantized by `output_quant`."""
        return target.conv(self, x)


class QuantDense(Dense, _IntegerLayer):
    """Dense with per-output-channel fake-quantized weights and an output quantized at `output_bits` (config's
    act_bits by default; the classifier's output is the logits, at edge_act_bits). In integer inference it takes
    quantized (N, C) codes and returns the dequantized output, as the exported model's last DequantizeLinear."""

    def __init__(self, in_channels, out_channels, *, config, output_bits=None):
        super().__init__(in_channels, out_channels)
        self._init_weight_quant(config, in_channels)
        self.output_quant = activation_quantizer(config, output_bits)

    def float_weights(self):
        """The weight and bias that inference quantizes."""
        return self.weight, self.bias

    def construct(self, x):
        if not self.training and self.integer_inference:
            return self.lower(self.deployment_target.arithmetic, x)
        weight, weight_scale = self.weight_quant.fake_quantize(self.weight)
        bias = self.deployed_bias(self.bias, weight_scale)
        return self.output_quant(self.low_precision(self.matmul, x, weight) + bias)

    def lower(self, target, x):
        """This layer as `target` deploys it: a matrix product of x's codes with `deployed_weights`, requantized
        by `output_quant` and dequantized."""
        return target.dense(self, x)


class QuantAdd(Add, _Deployed, UsesKernels):
    """Residual add whose sum is quantized, as an integer add requantizes its output."""

    def __init__(self, *, config):
        super().__init__()
        self.output_quant = activation_quantizer(config)
        self.use_kernel("add_kernel", qlinear_add_op)

    def construct(self, x, y):
        if not self.training and self.integer_inference:
            return self.lower(self.deployment_target.arithmetic, x, y)
        return self.output_quant(x + y)

    def lower(self, target, x, y):
        return target.add(self, x, y)


class _NetworkQuantizedOutput(nn.Cell, _Deployed):
    """A layer whose output quantizer is one of the network's own, held in a tuple, not as a sub-cell: its
    Parameters keep the network's names for it (MobileNetV2's input_quant and pool_quant)."""

    def __init__(self, output_quant):
        super().__init__()
        self.quantizer_ref = (output_quant,)

    @property
    def output_quant(self):
        return self.quantizer_ref[0]


class QuantInput(_NetworkQuantizedOutput):
    """The network's float input, fake-quantized by `output_quant`; in integer inference its codes, as the
    deployed model's QuantizeLinear."""

    def construct(self, x):
        if not self.training and self.integer_inference:
            return self.lower(self.deployment_target.arithmetic, x)
        return self.quantizer_ref[0](x)

    def lower(self, target, x):
        return target.quantize(self, x)


class QuantGlobalAveragePool(_NetworkQuantizedOutput):
    """Global average pooling whose output is quantized by `output_quant`, as the integer pooling requantizes it."""

    def construct(self, x):
        if not self.training and self.integer_inference:
            return self.lower(self.deployment_target.arithmetic, x)
        return self.quantizer_ref[0](ops.mean(x, (2, 3)))

    def lower(self, target, x):
        return target.global_average_pool(self, x)


class QuantLayers:
    """Builds the quantization-aware version of each kind of layer the network description asks for."""
    quantized = True

    def __init__(self, config):
        self.config = config

    def conv_bn_act(self, *args, **kwargs):
        return QuantConvBNAct(*args, config=self.config, **kwargs)

    def dense(self, *args):
        """The classifier: its output, the logits, is at the network's edge."""
        return QuantDense(*args, config=self.config, output_bits=self.config.edge_act_bits)

    def add(self):
        return QuantAdd(config=self.config)

    def edge_activation_quant(self):
        """The quantizer of an activation at the network's edge (its input, the classifier's input)."""
        return activation_quantizer(self.config, self.config.edge_act_bits)

    @staticmethod
    def quantize_input(output_quant):
        return QuantInput(output_quant)

    @staticmethod
    def global_average_pool(output_quant):
        return QuantGlobalAveragePool(output_quant)


def weight_layers(network):
    """{name: layer} of the layers of a quantized `network` whose weights are quantized, in network order."""
    return {name: cell for name, cell in network.cells_and_names() if isinstance(cell, _IntegerLayer)}


class OscillationDampening(nn.Cell):
    """`strength` times the sum, over the quantized weights of `network`, of Quantizer.grid_distance (Nagel et al.
    2022, "Overcoming Oscillations in Quantization-Aware Training"): added to the training loss, it pulls each
    latent weight toward the grid point it rounds to, so that weights near a rounding threshold stop flipping
    between two codes. The layers stay the network's own (same Parameters, same names)."""

    def __init__(self, network, strength):
        super().__init__(auto_prefix=False)
        self.layers = nn.CellList(list(weight_layers(network).values()), auto_prefix=False)
        self.strength = float(strength)

    def construct(self):
        total = 0.0
        for layer in self.layers:
            total = total + layer.weight_quant.grid_distance(layer.latent_weight())
        return self.strength * total


def set_layer_weight_bits(network, layer_weight_bits):
    """Quantize the weights of the layers `layer_weight_bits` names ({layer name: bits}, e.g. {"features.0": 7})
    at those bits, the other layers' at the config's weight_bits: a mixed-precision plan. Raises BitsPlanError
    naming layers the network does not have."""
    layers = weight_layers(network)
    unknown = sorted(set(layer_weight_bits) - set(layers))
    if unknown:
        names = list(layers)
        raise BitsPlanError(f"no quantized layer named {', '.join(unknown)} in this network; its {len(names)} "
                            f"layers are named as analyze.py's report names them: {', '.join(names[:3])}, ..., "
                            f"{names[-1]}")
    for name, bits in layer_weight_bits.items():
        layers[name].set_weight_bits(bits)
    # The new quantizers' Parameters are named from their own cell down; give every Parameter its full name
    # again (as the network's construction does), so checkpoints load by name.
    network.update_parameters_name()


def set_deployment_target(network, target):
    """Integer inference of the quantized `network` as `target` (src/targets) computes its deployed model. Takes
    effect in graphs compiled afterwards."""
    for _, cell in network.cells_and_names():
        if isinstance(cell, _Deployed):
            cell.deployment_target = target


def set_integer_inference(network, enabled):
    """Inference of the quantized `network` as the deployed integer model computes it (the default) or, with
    `enabled` False, as fake quantization in float. Takes effect in graphs compiled afterwards."""
    for _, cell in network.cells_and_names():
        if hasattr(cell, "integer_inference"):
            cell.integer_inference = enabled


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
