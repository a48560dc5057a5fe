"""LiteRT as a deployment target (src/targets/litert.py): the arithmetic integer inference computes for it against
LiteRT's own XNNPACK kernels, operator by operator where it differs from ONNX Runtime's (ADD, QUANTIZE), and a
whole exported network, image for image, with every operator on XNNPACK."""
import numpy as np
import pytest
from mindspore import nn, Tensor

from src.quant.layers import QuantAdd, QuantInput, set_deployment_target
from src.quant.quantizer import QuantConfig, activation_quantizer
from src.targets.litert import INT8_OFFSET, LITERT, TfliteModel
from src.targets.litert_run import fully_delegated
from src.targets.onnx_runtime import ONNX_RUNTIME

Interpreter = pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT (pip install ai-edge-litert) is a "
                                  "test dependency: requirements-test.txt").Interpreter
f32 = np.float32


def run_tflite(model, inputs):
    """Run a model's bytes in LiteRT's interpreter on its default path (XNNPACK); returns the first output. The
    interpreter's plan must be one XNNPACK partition that computes the model's output: nothing on the builtin
    kernels, which round otherwise."""
    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    assert fully_delegated(interpreter), "an operator left out of XNNPACK"
    output = interpreter.get_output_details()[0]["index"]
    for detail, value in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return interpreter.get_tensor(output)


def set_range(quantizer, scale, zero_point):
    """A range whose qparams are (scale, zero_point): [-zero_point, 255 - zero_point] steps."""
    quantizer.observer.min_val.set_data(Tensor(f32(-zero_point * scale)))
    quantizer.observer.max_val.set_data(Tensor(f32((255 - zero_point) * scale)))
    return tuple(float(t.asnumpy()) for t in quantizer.qparams())


class _Add(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, a, scale_a, zero_a, b, scale_b, zero_b):
        return self.layer((a, scale_a, zero_a), (b, scale_b, zero_b))[0]


def integer_add(target):
    """(a, b, ranges) -> our QuantAdd's integer inference for `target` of uint8 codes a and b, with ranges = (scale,
    zero point) of a, b and the output; one graph for every range (the output's is a Parameter)."""
    layer = QuantAdd(config=QuantConfig())
    set_deployment_target(layer, target)
    cell = _Add(layer)
    cell.set_train(False)

    def add(a, b, ranges):
        set_range(layer.output_quant, *ranges[2])
        (scale_a, zero_a), (scale_b, zero_b) = ranges[:2]
        return cell(*(Tensor(v) for v in (a.astype(f32), f32(scale_a), f32(zero_a), b.astype(f32), f32(scale_b),
                                          f32(zero_b)))).asnumpy()
    return add


def tflite_add(a, b, ranges):
    model = TfliteModel()
    int8 = model.schema.TensorType.INT8
    tensors = [model.tensor(name, a.shape, int8, scale=f32(scale), zero_point=zero_point - INT8_OFFSET)
               for name, (scale, zero_point) in zip("abc", ranges)]
    options = model.schema.AddOptionsT()
    model.op(model.schema.BuiltinOperator.ADD, tensors[:2], tensors[2:], model.schema.BuiltinOptions.AddOptions,
             options, version=2)
    codes = run_tflite(model.to_bytes(tensors[:2], tensors[2:]), [(c.astype(np.int16) - INT8_OFFSET).astype(np.int8)
                                                                  for c in (a, b)])
    return codes.astype(np.int16) + INT8_OFFSET


@pytest.mark.quick
def test_residual_add_gives_xnnpack_add_codes(rng):
    """Every pair of uint8 codes, for random ranges: among them ranges where ONNX Runtime's float arithmetic rounds
    some sums otherwise (about one code in 10^5), which the LiteRT target must not compute."""
    a, b = (g.reshape(1, 256 * 256).astype(np.uint8) for g in np.meshgrid(np.arange(256), np.arange(256)))
    ours, onnx_runtime = integer_add(LITERT), integer_add(ONNX_RUNTIME)
    cases, differing = [], []
    for _ in range(200):  # about 30 suffice
        if len(differing) == 3:
            break
        scales = rng.uniform(0.005, 0.1, 3).astype(f32)
        zeros = rng.integers(0, 256, 3)
        # the output's range as its quantizer computes it from an observed range
        ranges = [(scales[0], zeros[0]), (scales[1], zeros[1]),
                  set_range(activation_quantizer(QuantConfig()), scales[2], zeros[2])]
        computed = ours(a, b, ranges), onnx_runtime(a, b, ranges)
        if np.any(computed[0] != computed[1]):
            differing.append((ranges, computed))
        elif len(cases) < 3:
            cases.append((ranges, computed))
    for ranges, (litert_codes, _) in cases + differing:
        np.testing.assert_array_equal(litert_codes, tflite_add(a, b, ranges))
    assert len(differing) == 3, "no ranges where the two targets' arithmetic differ: the test cannot tell them apart"


class _Quantize(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x):
        return self.layer(x)[0]


@pytest.mark.quick
def test_input_quantization_gives_xnnpack_quantize_codes(rng):
    """Values at and around every code's rounding boundary: XNNPACK multiplies by the reciprocal of the scale,
    ONNX Runtime divides, and near the boundaries the two round apart."""
    quantizer = activation_quantizer(QuantConfig())
    scale, zero_point = set_range(quantizer, f32(0.0371), 117)
    boundaries = (np.arange(-117, 139) + 0.5).astype(f32) * f32(scale)
    x = np.concatenate([np.nextafter(boundaries, -np.inf), boundaries, np.nextafter(boundaries, np.inf),
                        rng.normal(0, 3, 4096).astype(f32)]).reshape(1, -1).astype(f32)
    model = TfliteModel()
    schema = model.schema
    source = model.tensor("x", x.shape, schema.TensorType.FLOAT32)
    codes = model.tensor("q", x.shape, schema.TensorType.INT8, scale=f32(scale), zero_point=zero_point - INT8_OFFSET)
    model.op(schema.BuiltinOperator.QUANTIZE, [source], [codes], version=2)
    theirs = run_tflite(model.to_bytes([source], [codes]), [x]).astype(np.int16) + INT8_OFFSET
    ours = {}
    for target in (LITERT, ONNX_RUNTIME):
        layer = QuantInput(quantizer)
        set_deployment_target(layer, target)
        cell = _Quantize(layer)
        cell.set_train(False)
        ours[target.name] = cell(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(ours["litert"], theirs)
    assert np.any(ours["onnxruntime"] != theirs)


@pytest.mark.quick
def test_an_operator_left_to_the_builtin_kernels_is_seen():
    """int8 AVERAGE_POOL_2D is one XNNPACK does not take: the check that every exported operator runs on XNNPACK
    must see it."""
    model = TfliteModel()
    schema = model.schema
    x = model.tensor("x", (1, 4, 4, 8), schema.TensorType.INT8, scale=f32(0.1), zero_point=-3)
    y = model.tensor("y", (1, 1, 1, 8), schema.TensorType.INT8, scale=f32(0.1), zero_point=-3)
    options = schema.Pool2DOptionsT()
    options.padding, options.strideH, options.strideW = schema.Padding.VALID, 1, 1
    options.filterHeight = options.filterWidth = 4
    model.op(schema.BuiltinOperator.AVERAGE_POOL_2D, [x], [y], schema.BuiltinOptions.Pool2DOptions, options,
             version=2)
    interpreter = Interpreter(model_content=model.to_bytes([x], [y]))
    interpreter.allocate_tensors()
    assert not fully_delegated(interpreter)


@pytest.mark.quick
def test_without_litert_the_message_names_the_package(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    with pytest.raises(ImportError, match="need LiteRT: pip install ai-edge-litert"):
        TfliteModel()
