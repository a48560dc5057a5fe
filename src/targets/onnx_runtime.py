"""ONNX Runtime on x86 as a deployment target: the integer arithmetic of its CPU kernels (`OnnxRuntimeArithmetic`,
what inference of a quantized network computes) and the writer of its INT8 QDQ ONNX model (`OnnxWriter`).

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
QLinearGlobalAveragePool (their arithmetic: src/quant/integer.py). The classifier is written as a 1x1 convolution
on the pooled (N, C, 1, 1) tensor: the same arithmetic as the dense layer, and it keeps the whole network in
integer kernels.

Both halves are targets of the network's dataflow (src/quant/dataflow.py), one method per deployed operator, and
name no attribute of the network: each quantized layer lowers itself to them.
"""
import numpy as np
import onnx
from mindspore import Tensor
from onnx import helper, numpy_helper, TensorProto

from src.evaluation import onnx_predictor
from src.quant import integer
from src.quant.dataflow import trace
from src.targets.target import DeploymentTarget, to_numpy

OPSET = 13


def _requantized(layer, product, x, relu6=False):
    """A quantized convolution or dense layer on x = (codes, scale, zero_point), as QLinearConv computes it:
    `product` (the layer's convolution or matrix product) of the centred codes and the layer's `deployed_weights`,
    requantized into its output quantizer's range, then clamped to its code bounds (`relu6`: a ReLU6 before it)."""
    codes, input_scale, input_zero_point = x
    weight_codes, weight_scale, bias = layer.deployed_weights(input_scale)
    product = integer.accumulate(product, codes - input_zero_point, weight_codes, layer.weight_digits)
    scale, zero_point = layer.output_quant.qparams()
    multiplier = input_scale * weight_scale / scale
    if layer.requantize_kernel is not None:  # the clamp to the code bounds in the same pass
        settings = layer.output_quant.requantize_settings(scale, zero_point, relu6)
        return layer.requantize_kernel(product, bias, multiplier, settings), scale, zero_point
    codes = integer.requantize(product, bias, multiplier, zero_point)
    return layer.output_quant.clamp_codes((codes, scale, zero_point), relu6)


class OnnxRuntimeArithmetic:
    """What ONNX Runtime's x86 kernels compute for each lowered layer, in MindSpore ops inside the compiled graph:
    activations travel as (codes, scale, zero_point); the network's output is dequantized logits."""

    @staticmethod
    def quantize(layer, x):
        quantizer = layer.output_quant
        return quantizer.clamp_codes(integer.quantize(x, *quantizer.qparams()))

    @staticmethod
    def conv(layer, x):
        return _requantized(layer, layer.conv, x, layer.activation)

    @staticmethod
    def dense(layer, x):
        return integer.dequantize(_requantized(layer, layer.matmul, x))

    @staticmethod
    def add(layer, a, b):
        scale, zero_point = layer.output_quant.qparams()
        constants = integer.add_constants(a, b, scale, zero_point)
        if layer.add_kernel is not None:
            codes = layer.add_kernel(a[0], b[0], constants)
        else:
            codes = integer.add(a[0], b[0], constants)
        return layer.output_quant.clamp_codes((codes, scale, zero_point))

    @staticmethod
    def global_average_pool(layer, x):
        quantizer = layer.output_quant
        return quantizer.clamp_codes(integer.global_average_pool(x, *quantizer.qparams()))


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

    def rename(self, output, name):
        """Give the node that writes `output` (the graph's output) that name instead."""
        node = next(node for node in self.nodes if output in node.output)
        node.output[0] = node.name = name


class _Activation:
    """A uint8-quantized tensor of the graph: its dequantized name, scale and zero point; `channels`: the width of
    a dense layer's (N, C) output."""

    def __init__(self, name, scale, zero_point, channels=None):
        self.name, self.scale, self.zero_point, self.channels = name, scale, zero_point, channels


def _quantize_activation(graph, x, quantizer, hint, relu6=False):
    """QuantizeLinear, an integer Clip of the uint8 codes where the quantizer's code bounds are narrower than
    [0, 255] (fewer bits; ReLU6 below the range's top: `relu6`), then DequantizeLinear."""
    qparams = quantizer.qparams()
    lowest, highest = (np.uint8(to_numpy(bound)) for bound in quantizer.code_bounds(*qparams, relu6))
    scale, zero_point = np.float32(to_numpy(qparams[0])), np.uint8(to_numpy(qparams[1]))
    scale_name, zp_name = graph.const(f"{hint}_scale", scale), graph.const(f"{hint}_zero_point", zero_point)
    q = graph.op("QuantizeLinear", [x, scale_name, zp_name], f"{hint}_q")
    if (lowest, highest) != (0, 255):
        q = graph.op("Clip", [q, graph.const(f"{hint}_code_min", lowest), graph.const(f"{hint}_code_max", highest)],
                     f"{hint}_code_clip")
    return _Activation(graph.op("DequantizeLinear", [q, scale_name, zp_name], f"{hint}_dq"), scale, zero_point)


def _conv(graph, x, layer, hint, activation=False, stride=1, padding=0, groups=1):
    """The layer's deployed constants (its `deployed_weights`, what integer inference computes with) written as
    DequantizeLinear -> Conv (-> ReLU6) -> QuantizeLinear -> DequantizeLinear."""
    q_weight, w_scale, q_bias = (to_numpy(t) for t in layer.deployed_weights(Tensor(x.scale)))
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


class OnnxWriter:
    """The QDQ ONNX writer as a target of the network's dataflow (src/quant/dataflow.py): each quantized layer,
    lowered, writes its operators; the values are the graph's dequantized activations. Node names start with the
    layer's name in the network."""

    def __init__(self, network):
        self.graph = _Graph()
        self.names = {id(cell): name.replace(".", "_") for name, cell in network.cells_and_names()}

    def input(self, name):
        return _Activation(name, None, None)

    def quantize(self, layer, x):
        return _quantize_activation(self.graph, x.name, layer.output_quant, self.names[id(layer)])

    def conv(self, layer, x):
        return _conv(self.graph, x, layer, self.names[id(layer)], layer.activation, layer.stride, layer.padding,
                     layer.groups)

    def dense(self, layer, x):
        """The dense layer as a 1x1 convolution on the pooled (N, C, 1, 1) tensor, flattened to (N, classes)."""
        hint = self.names[id(layer)]
        y = _conv(self.graph, x, layer, hint)
        return _Activation(self.graph.op("Flatten", [y.name], f"{hint}_flatten", axis=1), y.scale, y.zero_point,
                           channels=layer.weight.shape[0])

    def add(self, layer, a, b):
        hint = self.names[id(layer)]
        return _quantize_activation(self.graph, self.graph.op("Add", [a.name, b.name], hint), layer.output_quant,
                                    hint)

    def global_average_pool(self, layer, x):
        hint = self.names[id(layer)]
        return _quantize_activation(self.graph, self.graph.op("GlobalAveragePool", [x.name], hint),
                                    layer.output_quant, hint)


def export_onnx(network, path, input_shape):
    """Write the quantized `network` as an INT8 QDQ ONNX model with a dynamic batch dimension: input "input"
    (N, *input_shape) float32, normalised as for training; output "logits" (N, classes) float32, the output of
    the network's last layer (a quantized dense one)."""
    if not getattr(network, "quantized", False):
        raise ValueError("ONNX INT8 export needs a quantized network; this one is float")
    network.set_train(False)
    writer = OnnxWriter(network)
    output = trace(network, writer, writer.input("input"))
    graph = writer.graph
    if output.channels is None:
        raise ValueError("ONNX INT8 export writes networks whose output is a quantized dense layer's")
    graph.rename(output.name, "logits")
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", output.channels])]
    model = helper.make_model(helper.make_graph(graph.nodes, f"{type(network).__name__}_int8", inputs, outputs,
                                                graph.initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mobilenetv2-quant")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


ONNX_RUNTIME = DeploymentTarget(
    name="onnxruntime", runtime="ONNX Runtime (x86)", file_format="ONNX", suffix=".onnx",
    arithmetic=OnnxRuntimeArithmetic, export=export_onnx, predictor=onnx_predictor)
