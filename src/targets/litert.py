"""LiteRT (TensorFlow Lite) on its default CPU path, the XNNPACK delegate, as a deployment target: the integer
arithmetic XNNPACK computes (`LiteRTArithmetic`) and the writer of an int8 .tflite model (`TfliteWriter`).

The model is written from the trained quantization parameters with the flatbuffer schema that ships in the
`ai-edge-litert` wheel (no TensorFlow, no recalibration): QUANTIZE of the float NHWC input, CONV_2D and
DEPTHWISE_CONV_2D (int8 weights per output channel, int32 biases, ReLU6 fused), PAD where LiteRT's SAME padding
would place a strided window otherwise than ours, ADD, MEAN for the pooling, FULLY_CONNECTED for the classifier and
DEQUANTIZE of the logits. Activations are int8: our uint8 codes and zero points minus 128, which changes no
result. XNNPACK runs every one of these operators; its builtin fallback kernels round otherwise, so the tests
check that none is left to them.

What XNNPACK computes differs from ONNX Runtime's kernels in two operators, and `LiteRTArithmetic` models both:
- QUANTIZE multiplies by the reciprocal of the scale, float32(1 / scale), where ONNX Runtime divides by the scale.
- ADD is integer: each input's scale ratio to the output's becomes a multiplier of at most 21 bits, m = round(r *
  2^shift), with one shift chosen from the larger ratio (2^20 <= its multiplier < 2^21); then acc = m_a * (a -
  a_zero_point) + m_b * (b - b_zero_point) + 2^(shift - 1) in int32, and the codes are floor(acc / 2^shift) +
  zero_point: one rounding, half up.
Convolutions, the fully connected layer and MEAN requantize with ONNX Runtime's float expression
(float32(acc) * float32(s_in * s_w / s_out), rounded half to even), and are computed as for ONNX Runtime.
"""
import warnings

import numpy as np
import mindspore as ms
from mindspore import ops, Tensor

from src.quant import integer
from src.quant.dataflow import trace
from src.targets.target import DeploymentTarget, to_numpy
from src.targets.litert_run import TfliteRunner, fully_delegated
from src.targets.onnx_runtime import OnnxRuntimeArithmetic

INT8_OFFSET = 128  # int8 code = uint8 code - 128, for codes and zero points alike
ADD_MULTIPLIER_BITS = 20


class LiteRTArithmetic(OnnxRuntimeArithmetic):
    """What LiteRT's XNNPACK kernels compute for each lowered layer; on uint8 codes, which give the same results as
    XNNPACK's int8 ones (every operator works on codes minus zero points)."""

    @staticmethod
    def quantize(layer, x):
        quantizer = layer.output_quant
        scale, zero_point = quantizer.qparams()
        codes = integer.saturate(ops.round(x * (1.0 / scale)) + zero_point)
        return quantizer.clamp_codes((codes, scale, zero_point))

    @staticmethod
    def add(layer, a, b):
        (codes_a, scale_a, zero_a), (codes_b, scale_b, zero_b) = a, b
        scale, zero_point = layer.output_quant.qparams()
        multipliers, shift = add_multipliers(scale_a / scale, scale_b / scale)
        # In float64, where every term is an exact integer below 2^31, as in XNNPACK's int32 accumulator.
        acc = (multipliers[0] * (codes_a - zero_a).astype(ms.float64)
               + multipliers[1] * (codes_b - zero_b).astype(ms.float64) + ops.pow(2.0, shift - 1))
        codes = integer.saturate(ops.floor(acc / ops.pow(2.0, shift)).astype(ms.float32) + zero_point)
        return layer.output_quant.clamp_codes((codes, scale, zero_point))


def add_multipliers(ratio_a, ratio_b):
    """XNNPACK's fixed-point ADD parameters for float32 scale ratios (input scale / output scale): the two
    multipliers and the shift, as float64 tensors holding integers."""
    largest = ops.maximum(ratio_a, ratio_b)
    exponent = ops.floor(ops.log(largest.astype(ms.float64)) / np.log(2.0))
    # log2 of a float32 is exact at powers of two but may round across one from below: correct by a step.
    exponent = exponent - (ops.pow(2.0, exponent) > largest.astype(ms.float64)).astype(ms.float64) \
        + (ops.pow(2.0, exponent + 1) <= largest.astype(ms.float64)).astype(ms.float64)
    shift = ADD_MULTIPLIER_BITS - exponent
    scale = ops.pow(2.0, shift)
    # ratio * 2^shift is exact (a change of exponent); lrintf rounds it half to even.
    multipliers = ops.stack([ops.round(ratio_a.astype(ms.float64) * scale),
                             ops.round(ratio_b.astype(ms.float64) * scale)])
    return multipliers, shift


def _litert():
    try:
        from ai_edge_litert import schema_py_generated as schema
        import flatbuffers
    except ImportError as error:
        raise ImportError(f"TFLITE export and .tflite evaluation need LiteRT: pip install ai-edge-litert "
                          f"({error})") from None
    return schema, flatbuffers


class _Value:
    """A tensor of the model being written: its index, NHWC shape, and (quantized) scale and uint8 zero point."""

    def __init__(self, index, shape, scale=None, zero_point=None):
        self.index, self.shape, self.scale, self.zero_point = index, shape, scale, zero_point


class TfliteModel:
    """A .tflite model being built: tensors (constant ones with their data), operators, operator codes."""

    def __init__(self):
        self.schema, self.flatbuffers = _litert()
        self.tensors, self.operators, self.opcodes, self.operator_codes = [], [], {}, []
        self.buffers = [self.schema.BufferT()]  # buffer 0: the empty buffer of tensors without data

    def tensor(self, name, shape, dtype, data=None, scale=None, zero_point=None, axis=0):
        """A new tensor's index; `dtype` a schema.TensorType; quantized with (scale, zero_point), per channel
        along `axis` when they are arrays."""
        tensor = self.schema.TensorT()
        tensor.name, tensor.shape, tensor.type = name, list(shape), dtype
        tensor.buffer = 0
        if data is not None:
            buffer = self.schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        if scale is not None:
            quantization = self.schema.QuantizationParametersT()
            quantization.scale = [float(s) for s in np.atleast_1d(scale)]
            quantization.zeroPoint = [int(z) for z in np.atleast_1d(zero_point)]
            quantization.quantizedDimension = axis
            tensor.quantization = quantization
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def op(self, code, inputs, outputs, options_type=0, options=None, version=1):
        """An operator (a schema.BuiltinOperator) from tensors `inputs` to `outputs`."""
        if code not in self.opcodes:
            opcode = self.schema.OperatorCodeT()
            opcode.builtinCode, opcode.deprecatedBuiltinCode, opcode.version = code, min(code, 127), version
            self.opcodes[code] = len(self.operator_codes)
            self.operator_codes.append(opcode)
        operator = self.schema.OperatorT()
        operator.opcodeIndex, operator.inputs, operator.outputs = self.opcodes[code], list(inputs), list(outputs)
        operator.builtinOptionsType, operator.builtinOptions = options_type, options
        self.operators.append(operator)

    def to_bytes(self, inputs, outputs):
        """The model's flatbuffer, with one subgraph from tensors `inputs` to `outputs`."""
        subgraph = self.schema.SubGraphT()
        subgraph.tensors, subgraph.operators, subgraph.name = self.tensors, self.operators, "main"
        subgraph.inputs, subgraph.outputs = list(inputs), list(outputs)
        model = self.schema.ModelT()
        model.version, model.description = 3, "mobilenetv2-quant int8"
        model.subgraphs, model.buffers, model.operatorCodes = [subgraph], self.buffers, self.operator_codes
        builder = self.flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


class TfliteWriter:
    """The int8 .tflite writer as a target of the network's dataflow (src/quant/dataflow.py): each quantized layer,
    lowered, writes its operators into `model`. Tensor names start with the layer's name in the network."""

    def __init__(self, network, input_shape):
        self.model = TfliteModel()
        self.schema = self.model.schema
        self.names = {id(cell): name for name, cell in network.cells_and_names()}
        channels, height, width = input_shape
        self.input = _Value(self.model.tensor("input", (1, height, width, channels), self.schema.TensorType.FLOAT32),
                            (1, height, width, channels))
        self.model.tensors[-1].shapeSignature = [-1, height, width, channels]  # any batch size

    def _activation(self, name, shape, quantizer):
        """An int8 activation tensor in `quantizer`'s range. LiteRT clamps only to int8 and to a fused ReLU6, so
        codes bounded more narrowly (fewer than 8 bits) cannot be written."""
        if (quantizer.qmin, quantizer.qmax) != (0, integer.ACTIVATION_CODES):
            raise ValueError(f"TFLITE export writes 8-bit activations; {name} is quantized to codes "
                             f"[{quantizer.qmin}, {quantizer.qmax}], a clamp LiteRT's int8 kernels cannot express")
        scale, zero_point = (to_numpy(t) for t in quantizer.qparams())
        zero_point = np.int64(zero_point) - INT8_OFFSET
        index = self.model.tensor(name, shape, self.schema.TensorType.INT8, scale=np.float32(scale),
                                  zero_point=zero_point)
        return _Value(index, shape, np.float32(scale), int(zero_point) + INT8_OFFSET)

    def _weights(self, name, codes, axis, weight_scale, bias, input_scale):
        """A layer's constant tensors: int8 weight codes per output channel (along `axis`), int32 bias codes at
        input_scale * weight_scale."""
        zeros = np.zeros(len(weight_scale), np.int64)
        int8, int32 = self.schema.TensorType.INT8, self.schema.TensorType.INT32
        w = self.model.tensor(f"{name}.weight", codes.shape, int8, codes.astype(np.int8), weight_scale, zeros, axis)
        b = self.model.tensor(f"{name}.bias", bias.shape, int32, bias.astype(np.int32),
                              (input_scale * weight_scale).astype(np.float32), zeros)
        return w, b

    def quantize(self, layer, x):
        name = self.names[id(layer)]
        y = self._activation(name, x.shape, layer.output_quant)
        self.model.op(self.schema.BuiltinOperator.QUANTIZE, [x.index], [y.index], version=2)
        return y

    def conv(self, layer, x):
        schema = self.schema
        name = self.names[id(layer)]
        codes, weight_scale, bias = (to_numpy(t) for t in layer.deployed_weights(Tensor(x.scale)))
        out_channels, _, kernel, _ = codes.shape
        x = self._pad(x, layer, name)
        batch, height, width, in_channels = x.shape
        out_h, out_w = (height - kernel) // layer.stride + 1, (width - kernel) // layer.stride + 1
        y = self._activation(f"{name}.output", (batch, out_h, out_w, out_channels), layer.output_quant)
        depthwise = layer.groups == in_channels == out_channels and layer.groups > 1
        if layer.groups != 1 and not depthwise:
            raise ValueError(f"TFLITE export writes plain and depthwise convolutions; {name} has {layer.groups} "
                             f"groups")
        # OHWI for a convolution, 1HWO for a depthwise one: the output channel's axis is the quantized one.
        weights = codes.transpose(1, 2, 3, 0) if depthwise else codes.transpose(0, 2, 3, 1)
        axis = 3 if depthwise else 0
        w, b = self._weights(name, weights, axis, weight_scale, bias, x.scale)
        if depthwise:
            options = schema.DepthwiseConv2DOptionsT()
            options.depthMultiplier = 1
            code, options_type = schema.BuiltinOperator.DEPTHWISE_CONV_2D, schema.BuiltinOptions.DepthwiseConv2DOptions
        else:
            options = schema.Conv2DOptionsT()
            code, options_type = schema.BuiltinOperator.CONV_2D, schema.BuiltinOptions.Conv2DOptions
        options.padding = schema.Padding.VALID
        options.strideH = options.strideW = layer.stride
        options.dilationHFactor = options.dilationWFactor = 1
        options.fusedActivationFunction = (schema.ActivationFunctionType.RELU6 if layer.activation
                                           else schema.ActivationFunctionType.NONE)
        self.model.op(code, [x.index, w, b], [y.index], options_type, options, version=3)
        return y

    def _pad(self, x, layer, name):
        """x padded by the layer's padding (with its zero point's code, which is 0.0), for a VALID convolution."""
        if layer.padding == 0:
            return x
        schema = self.schema
        pad = layer.padding
        batch, height, width, channels = x.shape
        shape = (batch, height + 2 * pad, width + 2 * pad, channels)
        paddings = self.model.tensor(f"{name}.paddings", (4, 2), schema.TensorType.INT32,
                                     np.array([[0, 0], [pad, pad], [pad, pad], [0, 0]], np.int32))
        y = self.model.tensor(f"{name}.padded", shape, schema.TensorType.INT8, scale=x.scale,
                              zero_point=x.zero_point - INT8_OFFSET)
        self.model.op(schema.BuiltinOperator.PAD, [x.index, paddings], [y], schema.BuiltinOptions.PadOptions,
                      schema.PadOptionsT(), version=2)
        return _Value(y, shape, x.scale, x.zero_point)

    def dense(self, layer, x):
        schema = self.schema
        name = self.names[id(layer)]
        codes, weight_scale, bias = (to_numpy(t) for t in layer.deployed_weights(Tensor(x.scale)))
        out_channels = codes.shape[0]
        shape = (x.shape[0], out_channels)
        y = self._activation(f"{name}.output", shape, layer.output_quant)
        w, b = self._weights(name, codes, 0, weight_scale, bias, x.scale)
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = schema.ActivationFunctionType.NONE
        self.model.op(schema.BuiltinOperator.FULLY_CONNECTED, [x.index, w, b], [y.index],
                      schema.BuiltinOptions.FullyConnectedOptions, options, version=5)
        logits = self.model.tensor("logits", shape, schema.TensorType.FLOAT32)
        self.model.op(schema.BuiltinOperator.DEQUANTIZE, [y.index], [logits], version=2)
        return _Value(logits, shape)

    def add(self, layer, a, b):
        schema = self.schema
        y = self._activation(self.names[id(layer)], a.shape, layer.output_quant)
        options = schema.AddOptionsT()
        options.fusedActivationFunction = schema.ActivationFunctionType.NONE
        self.model.op(schema.BuiltinOperator.ADD, [a.index, b.index], [y.index], schema.BuiltinOptions.AddOptions,
                      options, version=2)
        return y

    def global_average_pool(self, layer, x):
        schema = self.schema
        name = self.names[id(layer)]
        y = self._activation(name, (x.shape[0], x.shape[3]), layer.output_quant)
        axes = self.model.tensor(f"{name}.axes", (2,), schema.TensorType.INT32, np.array([1, 2], np.int32))
        options = schema.ReducerOptionsT()
        options.keepDims = False
        self.model.op(schema.BuiltinOperator.MEAN, [x.index, axes], [y.index], schema.BuiltinOptions.ReducerOptions,
                      options, version=2)
        return y


def export_tflite(network, path, input_shape):
    """Write the quantized `network` as an int8 .tflite model: input "input" (N, H, W, 3) float32, NHWC,
    normalised as for training (N free: resize it in the interpreter); output "logits" (N, classes) float32."""
    if not getattr(network, "quantized", False):
        raise ValueError("TFLITE export writes a quantized network; this one is float")
    network.set_train(False)
    writer = TfliteWriter(network, input_shape)
    output = trace(network, writer, writer.input)
    if len(output.shape) != 2 or output.scale is not None:
        raise ValueError("TFLITE export writes networks whose output is a quantized dense layer's")
    with open(path, "wb") as f:
        f.write(writer.model.to_bytes([writer.input.index], [output.index]))


def tflite_predictor(path):
    """Images (N, 3, H, W) -> logits through LiteRT's interpreter on its default CPU path (XNNPACK); a warning when
    an operator is left to the builtin kernels. The function's `input_record` gives the image size the model
    takes."""
    _litert()
    from src.dataset import DatasetError

    def check(interpreter):
        if not fully_delegated(interpreter):
            warnings.warn(f"{path}: LiteRT runs some operators on its builtin kernels, not XNNPACK; they round "
                          f"otherwise, and the results may differ from the checkpoint's")
    run = TfliteRunner(path, check)
    size = run.size

    def predict(images):
        if images.shape[2:] != size:
            raise DatasetError(f"{path} takes {size[0]}x{size[1]} images, the data pipeline gives "
                               f"{images.shape[2]}x{images.shape[3]}: give --image_height {size[0]} "
                               f"--image_width {size[1]}")
        return run(images.transpose(0, 2, 3, 1))
    predict.input_record = {"image_height": size[0], "image_width": size[1]}
    return predict


LITERT = DeploymentTarget(
    name="litert", runtime="LiteRT (XNNPACK)", file_format="TFLITE", suffix=".tflite", arithmetic=LiteRTArithmetic,
    export=export_tflite, predictor=tflite_predictor)
