"""MobileNetV2 (Sandler et al. 2018), described once and built float or quantization-aware from that one
description: the layer kinds come from `FloatLayers` or `QuantLayers`, the architecture does not change."""
import math

from mindspore import nn

from src.layers import FloatLayers, make_divisible
from src.quant.dataflow import link_input_quantizers
from src.quant.layers import QuantLayers, set_layer_weight_bits
from src.quant.quantizer import QuantConfig

# (expansion t, output channels c, repeats n, first stride s) of each stage of inverted residual blocks.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class InvertedResidual(nn.Cell):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; a residual add where shapes allow."""

    def __init__(self, layers, in_channels, out_channels, stride, expand_ratio):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        blocks = []
        if expand_ratio != 1:
            blocks.append(layers.conv_bn_act(in_channels, hidden, kernel_size=1))
        blocks += [
            layers.conv_bn_act(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            layers.conv_bn_act(hidden, out_channels, kernel_size=1, activation=False),
        ]
        self.conv = nn.SequentialCell(blocks)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.add = layers.add() if self.use_residual else None

    def construct(self, x):
        if self.use_residual:
            return self.add(x, self.conv(x))
        return self.conv(x)


class MobileNetV2(nn.Cell):
    """MobileNetV2 for any input size; `quant_config` (a QuantConfig) makes it quantization-aware. `width_mult`
    scales every layer's channels, `depth_mult` each stage's number of blocks (rounded up, so every stage keeps at
    least one, as timm's depth multiplier)."""

    def __init__(self, num_classes=1000, width_mult=1.0, quant_config=None, depth_mult=1.0):
        super().__init__()
        if not depth_mult > 0:
            raise ValueError(f"depth_mult must be positive, got {depth_mult}")
        layers = QuantLayers(quant_config) if quant_config is not None else FloatLayers()
        self.quantized = layers.quantized
        self.num_classes, self.width_mult, self.depth_mult = num_classes, width_mult, depth_mult
        self.quant_config = quant_config
        # The network input is quantized too: the integer model starts from quantized pixels.
        self.input_quant = layers.edge_activation_quant()
        self.quantize_input = layers.quantize_input(self.input_quant)
        in_channels = make_divisible(STEM_CHANNELS * width_mult)
        last_channels = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        features = [layers.conv_bn_act(3, in_channels, kernel_size=3, stride=2)]
        for expand_ratio, channels, repeats, stride in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(channels * width_mult)
            for i in range(math.ceil(repeats * depth_mult)):
                features.append(InvertedResidual(layers, in_channels, out_channels, stride if i == 0 else 1,
                                                 expand_ratio))
                in_channels = out_channels
        features.append(layers.conv_bn_act(in_channels, last_channels, kernel_size=1))
        self.features = nn.SequentialCell(features)
        self.pool_quant = layers.edge_activation_quant()
        self.pool = layers.global_average_pool(self.pool_quant)
        self.classifier = layers.dense(last_channels, num_classes)
        if quant_config is not None:
            if quant_config.layer_weight_bits:
                set_layer_weight_bits(self, dict(quant_config.layer_weight_bits))
            link_input_quantizers(self)

    def construct(self, x):
        # Quantized, in integer inference: activations travel as (codes, scale, zero point) from the input
        # quantizer to the classifier, which returns the dequantized logits (src/quant/layers.py). The same
        # construct is the dataflow that export writes (src/quant/dataflow.py).
        return self.classifier(self.pool(self.features(self.quantize_input(x))))


def mobilenet_v2(num_classes=1000, width_mult=1.0, quant_config=None, depth_mult=1.0):
    return MobileNetV2(num_classes, width_mult, quant_config, depth_mult)


def network_from_config(config, quantized, sync_group=None):
    """The float or quantization-aware MobileNetV2 that `config` (src/config.py) describes."""
    quant_config = None
    if quantized:
        quant_config = QuantConfig.from_config(config, sync_group)
    return mobilenet_v2(config.num_classes, config.width_mult, quant_config, config.depth_mult)
