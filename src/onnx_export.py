"""INT8 ONNX export of the quantization-aware MobileNetV2: a QDQ model that ONNX Runtime runs with integer kernels.

MindSpore's own ONNX export writes fake-quant as float arithmetic, so the graph is written here from the trained
Parameters with the `onnx` helpers: QuantizeLinear/DequantizeLinear (opset 13, per-channel weights) around each
convolution, the residual adds and the pooling, with
  - weights and biases: each layer's `deployed_weights`, the constants its integer inference computes with: the
    BN-folded weights (running statistics) rounded to int8 with the weight quantizer's per-channel scales (7- or
    8-bit values, zero point 0), the folded bias in int32 at scale input_scale * weight_scale;
  - activations: uint8 with the scales and zero points of training's quantizers; where a quantizer's codes are
    bounded more narrowly than uint8 (fewer than 8 bits; ReLU6, whose 6 may lie below the range's top), an
    integer Clip of the codes follows the QuantizeLinear: ReLU6 is a clamp of codes, never a float Clip, so
    nothing stays in float.
ONNX Runtime's QDQ fusion turns Q -> DQ -> Conv -> Q into QLinearConv, Add into QLinearAdd and the pooling into
QLinearGlobalAveragePool. The classifier is written as a 1x1 convolution on the pooled (N, C, 1, 1)
tensor: the same arithmetic as the dense layer, and it keeps the whole network in integer kernels.

`export_onnx` mirrors MobileNetV2.construct; a change of the architecture changes both. Inference of the quantized
network computes this graph's arithmetic as ONNX Runtime does (src/quant/integer.py).
"""
import numpy as np
import onnx
from mindspore import Tensor
from onnx import helper, numpy_helper, TensorProto

from src.quant.layers import QuantConvBNAct

OPSET = 13


class _Graph:
    """Nodes and initializers of the graph being written, with unique names."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint, array):
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        output = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output


class _Activation:
    """A uint8-quantized tensor of the graph: its dequantized name, scale and zero point."""

    def __init__(self, name, scale, zero_point):
        self.name, self.scale, self.zero_point = name, scale, zero_point


def _numpy(tensor):
    return tensor.asnumpy() if hasattr(tensor, "asnumpy") else np.asarray(tensor)


def _quantize_activation(graph, x, quantizer, hint, relu6=False):
    """QuantizeLinear, an integer Clip of the uint8 codes where the quantizer's code bounds are narrower than
    [0, 255] (fewer bits; ReLU6 below the range's top: `relu6`), then DequantizeLinear."""
    qparams = quantizer.qparams()
    lowest, highest = (np.uint8(_numpy(bound)) for bound in quantizer.code_bounds(*qparams, relu6))
    scale, zero_point = np.float32(_numpy(qparams[0])), np.uint8(_numpy(qparams[1]))
    scale_name, zp_name = graph.const(f"{hint}_scale", scale), graph.const(f"{hint}_zero_point", zero_point)
    q = graph.op("QuantizeLinear", [x, scale_name, zp_name], f"{hint}_q")
    if (lowest, highest) != (0, 255):
        q = graph.op("Clip", [q, graph.const(f"{hint}_code_min", lowest), graph.const(f"{hint}_code_max", highest)],
                     f"{hint}_code_clip")
    return _Activation(graph.op("DequantizeLinear", [q, scale_name, zp_name], f"{hint}_dq"), scale, zero_point)


def _conv(graph, x, layer, hint, activation=False, stride=1, padding=0, groups=1):
    """The layer's deployed constants (its `deployed_weights`, what integer inference computes with) written as
    DequantizeLinear -> Conv (-> ReLU6) -> QuantizeLinear -> DequantizeLinear."""
    q_weight, w_scale, q_bias = (_numpy(t) for t in layer.deployed_weights(Tensor(x.scale)))
    q_weight = q_weight.astype(np.int8)
    if q_weight.ndim == 2:  # the classifier, as a 1x1 convolution
        q_weight = q_weight.reshape(q_weight.shape + (1, 1))
    bias_scale = (x.scale * w_scale).astype(np.float32)
    channels = len(w_scale)
    w = graph.op("DequantizeLinear", [graph.const(f"{hint}_w", q_weight), graph.const(f"{hint}_w_scale", w_scale),
                                      graph.const(f"{hint}_w_zp", np.zeros(channels, np.int8))], f"{hint}_w_dq",
                 axis=0)
    b = graph.op("DequantizeLinear", [graph.const(f"{hint}_b", q_bias), graph.const(f"{hint}_b_scale", bias_scale),
                                      graph.const(f"{hint}_b_zp", np.zeros(channels, np.int32))], f"{hint}_b_dq",
                 axis=0)
    kernel = list(q_weight.shape[2:])
    y = graph.op("Conv", [x.name, w, b], f"{hint}_conv", kernel_shape=kernel, strides=[stride, stride],
                 pads=[padding] * 4, group=groups)
    # ReLU6 is a clamp of the output codes (the quantizer's code_bounds), so the convolution stays integer.
    return _quantize_activation(graph, y, layer.output_quant, hint, relu6=activation)


def _conv_bn_act(graph, x, layer, hint):
    return _conv(graph, x, layer, hint, layer.activation, layer.stride, layer.padding, layer.groups)


def export_onnx(network, path, image_height, image_width):
    """Write the quantized `network` (a MobileNetV2 built with a QuantConfig) as an INT8 QDQ ONNX model with a
    dynamic batch dimension: input "input" (N, 3, H, W) float32, normalised as for training; output "logits"."""
    if not getattr(network, "quantized", False):
        raise ValueError("ONNX INT8 export needs a quantized network; this one is float")
    network.set_train(False)
    graph = _Graph()
    x = _quantize_activation(graph, "input", network.input_quant, "input")
    for index, block in enumerate(network.features):
        if isinstance(block, QuantConvBNAct):
            x = _conv_bn_act(graph, x, block, f"features{index}")
            continue
        y = x
        for sub, layer in enumerate(block.conv):
            y = _conv_bn_act(graph, y, layer, f"features{index}_{sub}")
        if block.use_residual:
            y = _quantize_activation(graph, graph.op("Add", [x.name, y.name], f"features{index}_add"),
                                     block.add.output_quant, f"features{index}_add")
        x = y
    pooled = graph.op("GlobalAveragePool", [x.name], "pool")
    x = _quantize_activation(graph, pooled, network.pool_quant, "pool")
    logits = _conv(graph, x, network.classifier, "classifier")
    graph.nodes.append(helper.make_node("Flatten", [logits.name], ["logits"], name="logits", axis=1))

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image_height, image_width])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", network.num_classes])]
    model = helper.make_model(helper.make_graph(graph.nodes, "mobilenetV2_int8", inputs, outputs,
                                                graph.initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mobilenetv2-quant")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return logits.scale  # the output quantization step
