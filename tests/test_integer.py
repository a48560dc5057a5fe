"""Integer inference (src/quant/integer.py) against ONNX Runtime's own kernels, operator by operator: our layers in
inference mode and ORT's QLinearConv, QLinearAdd, QLinearGlobalAveragePool, QuantizeLinear and DequantizeLinear
on the same codes and constants give the same output codes, all of them."""
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from mindspore import nn, ops, Tensor
from onnx import helper, numpy_helper, TensorProto

from conftest import evaluate_learned, learned_argv
from src.kernels import stock_convolution, use_mindspore_ops
from src.quant import integer
from src.quant.layers import QuantAdd, QuantConvBNAct, QuantDense
from src.quant.quantizer import QuantConfig

f32 = np.float32
rng = None


@pytest.fixture(autouse=True)
def seeded(request):
    """Each test's random values from its own name: the same whichever tests run before it."""
    global rng
    rng = np.random.default_rng(zlib.crc32(request.node.name.encode()))


def cpu_has_vnni():
    with open("/proc/cpuinfo") as info:
        flags = info.read()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def ort_run(node, inputs, constants, output_type=TensorProto.UINT8):
    """One ONNX Runtime node on uint8 `inputs` (name -> array) with `constants` (name -> array)."""
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info(name, TensorProto.UINT8, list(value.shape))
                       for name, value in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], output_type, None)],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


class Deployed(nn.Cell):
    """A quantized layer in inference mode on quantized inputs, each given as codes, scale and zero point."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, *quantized):
        inputs = [(quantized[i], quantized[i + 1], quantized[i + 2]) for i in range(0, len(quantized), 3)]
        out = self.layer(*inputs)
        return out if isinstance(self.layer, QuantDense) else out[0]


# Both ways integer inference runs: our CPU kernels (requantization, the add, direct convolutions) and MindSpore ops.
PATHS = ["cpu_kernels", "mindspore_ops"]


def on_path(layer, path):
    if path == "mindspore_ops":
        use_mindspore_ops(layer)
    kernel = getattr(layer, "requantize_kernel", getattr(layer, "add_kernel", None))
    assert (kernel is not None) == (path == "cpu_kernels" and not getattr(layer, "weight_digits", False))
    return layer


def run_deployed(layer, *quantized):
    """quantized: (codes uint8 array, scale, zero point) per input."""
    cell = Deployed(layer)
    cell.set_train(False)
    args = []
    for codes, scale, zero_point in quantized:
        args += [Tensor(codes.astype(f32)), Tensor(f32(scale)), Tensor(f32(zero_point))]
    return cell(*args).asnumpy()


def set_range(quantizer, low, high):
    quantizer.observer.min_val.set_data(Tensor(f32(low)))
    quantizer.observer.max_val.set_data(Tensor(f32(high)))


def random_codes(shape):
    return rng.integers(0, 256, shape).astype(np.uint8)


def conv_layer(cin, cout, kernel, stride, groups, activation, bits, act_bits=8):
    layer = QuantConvBNAct(cin, cout, kernel, stride, groups, activation,
                           config=QuantConfig(weight_bits=bits, act_bits=act_bits))
    for name, value in (("gamma", rng.uniform(0.5, 2, cout)), ("beta", rng.normal(0, 1, cout)),
                        ("moving_mean", rng.normal(0, 1, cout)), ("moving_variance", rng.uniform(0.5, 3, cout))):
        getattr(layer, name).set_data(Tensor(value.astype(f32)))
    return layer


def float_conv(layer, x):
    """The layer's folded convolution in float on dequantized x: what sets a realistic output range."""
    weight, bias = (t.asnumpy() for t in layer.fold())
    conv = stock_convolution(layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.groups)
    return conv(Tensor(x), Tensor(weight)).asnumpy() + bias.reshape(1, -1, 1, 1)


def ort_conv(layer, codes, scale, zero_point, weight_codes, weight_scale, bias):
    out_scale, out_zero_point = (t.asnumpy() for t in layer.output_quant.observer.qparams())
    if weight_codes.ndim == 2:
        weight_codes = weight_codes.reshape(weight_codes.shape + (1, 1))
    kernel = weight_codes.shape[2]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            kernel_shape=[kernel, kernel], strides=[getattr(layer, "stride", 1)] * 2,
                            pads=[getattr(layer, "padding", 0)] * 4, group=getattr(layer, "groups", 1))
    return ort_run(node, {"x": codes}, dict(
        xs=f32(scale), xz=np.uint8(zero_point), w=weight_codes.astype(np.int8), ws=weight_scale.astype(f32),
        wz=np.zeros(len(weight_scale), np.int8), ys=f32(out_scale), yz=np.uint8(out_zero_point),
        b=bias.astype(np.int32)))


CONVS = {"stem": (3, 16, 3, 2, 1, True), "depthwise": (24, 24, 3, 1, 24, True),
         "depthwise_stride2": (24, 24, 3, 2, 24, True), "expand": (16, 96, 1, 1, 1, True),
         "project": (96, 24, 1, 1, 1, False), "wide_project": (960, 160, 1, 1, 1, False)}


@pytest.mark.quick
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize("kind", list(CONVS))
def test_convolution_gives_qlinearconv_codes(kind, bits, path):
    if bits == 8 and not cpu_has_vnni():
        pytest.skip("8-bit weights: ONNX Runtime's AVX2 kernels (no VNNI) saturate 16-bit pair sums")
    cin, cout, kernel, stride, groups, activation = CONVS[kind]
    layer = on_path(conv_layer(cin, cout, kernel, stride, groups, activation, bits), path)
    codes, scale, zero_point = random_codes((2, cin, 9, 9)), f32(0.02), 0 if activation else 131
    reference = float_conv(layer, (codes.astype(f32) - zero_point) * scale)
    low, high = (0.0, min(6.0, reference.max() * 0.9)) if activation else np.quantile(reference, [0.02, 0.98])
    set_range(layer.output_quant, low, high)
    ours = run_deployed(layer, (codes, scale, zero_point))
    constants = [t.asnumpy() for t in layer.deployed_weights(Tensor(scale))]
    theirs = ort_conv(layer, codes, scale, zero_point, *constants)
    assert layer.weight_digits == (kind == "wide_project" and bits == 8)
    assert np.mean((theirs > 0) & (theirs < 255)) > 0.2  # not saturated (ReLU6 puts about half at 0)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.quick
@pytest.mark.parametrize("path", PATHS)
def test_low_bit_codes_are_clamped_as_training_clamps_them(path):
    """4-bit activations after ReLU6, with a range whose top (12) lies above 6: QLinearConv's uint8 codes clamped
    to [code of 0, code of 6] = [0, round(6 / (12 / 15))] = [0, 8] (half to even), as fake quantization clamps
    relu6's output; without ReLU6, to [0, 15]."""
    cin, cout, kernel, stride, groups, _ = CONVS["expand"]
    for activation, bounds in ((True, (0, 8)), (False, (0, 15))):
        layer = on_path(conv_layer(cin, cout, kernel, stride, groups, activation, bits=7, act_bits=4), path)
        set_range(layer.output_quant, 0.0, 12.0)
        quantizer = layer.output_quant
        assert tuple(float(b) for b in quantizer.code_bounds(*quantizer.qparams(), activation)) == bounds
        codes, scale = random_codes((2, cin, 9, 9)), f32(0.05)
        ours = run_deployed(layer, (codes, scale, 0))
        theirs = ort_conv(layer, codes, scale, 0, *[t.asnumpy() for t in layer.deployed_weights(Tensor(scale))])
        assert theirs.max() > bounds[1]  # the clamp binds
        np.testing.assert_array_equal(ours, np.clip(theirs, *bounds))


@pytest.mark.quick
@pytest.mark.parametrize("features", [1280, 80])
def test_classifier_gives_qlinearconv_then_dequantize(features):
    """The dense classifier, exported as a 1x1 QLinearConv then DequantizeLinear: over 1280 features (full width)
    its weights go digit by digit (1280 * 255 * 63 leaves float32's exact integers), over 80 (the tests' width)
    in one piece, through the Requantize kernel."""
    layer = on_path(QuantDense(features, 10, config=QuantConfig(weight_bits=7)), "cpu_kernels")
    layer.weight.set_data(Tensor(rng.normal(0, 0.05, (10, features)).astype(f32)))
    layer.bias.set_data(Tensor(rng.normal(0, 0.5, 10).astype(f32)))
    codes, scale, zero_point = random_codes((4, features)), f32(0.03), 0
    set_range(layer.output_quant, -4.0 * features / 1280, 6.0 * features / 1280)
    ours = run_deployed(layer, (codes, scale, zero_point))
    constants = [t.asnumpy() for t in layer.deployed_weights(Tensor(scale))]
    theirs = ort_conv(layer, codes.reshape(4, features, 1, 1), scale, zero_point, *constants).reshape(4, 10)
    out_scale, out_zero_point = (t.asnumpy() for t in layer.output_quant.observer.qparams())
    dequantized = ort_run(helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"]), {"x": theirs},
                          dict(s=f32(out_scale), z=np.uint8(out_zero_point)), TensorProto.FLOAT)
    assert layer.weight_digits == (features == 1280)
    assert 0 < np.mean(np.abs(dequantized) < 0.9 * 6.0 * features / 1280)  # not all saturated
    np.testing.assert_array_equal(ours, dequantized)


@pytest.mark.quick
def test_wide_products_are_exact_by_weight_digits():
    """A product beyond float32's exact integers (an odd sum above 2^24, which float32 cannot even hold): digit by
    digit it is exact, in one piece it is not (what the digits are for)."""
    fan_in = 2048
    x = np.full((1, fan_in), 255.0, f32)
    weight = np.full((1, fan_in), 63.0, f32)
    weight[0, 0] = 62.0
    want = np.int64(255) * weight.astype(np.int64).sum()
    matmul = ops.MatMul(transpose_b=True)
    assert integer.needs_weight_digits(fan_in, 63)
    by_digits = integer.accumulate(matmul, Tensor(x), Tensor(weight), True).asnumpy()
    assert by_digits.item() == want
    assert integer.accumulate(matmul, Tensor(x), Tensor(weight), False).asnumpy().item() != want


def _contraction_sensitive_ranges(count):
    """(scale_a, scale_b, scale_c, zero points) where the constant of MLAS's QLinearAdd differs depending on
    whether `ra * za + rb * zb` is rounded once (fused) or twice: the cases that tell the two apart."""
    found = []
    while len(found) < count:
        scales = rng.uniform(0.005, 0.1, 3).astype(f32)
        zeros = rng.integers(0, 256, 3)
        ra, rb = f32(scales[0] / scales[2]), f32(scales[1] / scales[2])
        fused = f32(np.float64(ra) * zeros[0] + np.float64(f32(rb * f32(zeros[1]))))
        if fused != f32(f32(ra * f32(zeros[0])) + f32(rb * f32(zeros[1]))):
            found.append((scales, zeros))
    return found


@pytest.mark.quick
@pytest.mark.parametrize("path", PATHS)
def test_residual_add_gives_qlinearadd_codes(path):
    """Every pair of uint8 codes, for random ranges and for ranges where the rounding of MLAS's constant matters."""
    a, b = (g.reshape(1, 1, 256, 256).astype(np.uint8) for g in np.meshgrid(np.arange(256), np.arange(256)))
    cases = [(rng.uniform(0.005, 0.1, 3).astype(f32), rng.integers(0, 256, 3)) for _ in range(3)]
    for scales, zeros in cases + _contraction_sensitive_ranges(3):
        layer = on_path(QuantAdd(config=QuantConfig()), path)
        # a range whose qparams are exactly (scales[2], zeros[2])
        set_range(layer.output_quant, -f32(zeros[2]) * scales[2], (255 - f32(zeros[2])) * scales[2])
        out_scale, out_zero = (t.asnumpy() for t in layer.output_quant.observer.qparams())
        ours = run_deployed(layer, (a, scales[0], zeros[0]), (b, scales[1], zeros[1]))
        node = helper.make_node("QLinearAdd", ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], ["c"],
                                domain="com.microsoft")
        theirs = ort_run(node, {"a": a, "b": b}, dict(
            **{"as": f32(scales[0])}, az=np.uint8(zeros[0]), bs=f32(scales[1]), bz=np.uint8(zeros[1]),
            cs=f32(out_scale), cz=np.uint8(out_zero)))
        np.testing.assert_array_equal(ours, theirs)


class _Pool(nn.Cell):
    def construct(self, codes, scale, zero_point, out_scale, out_zero_point):
        return integer.global_average_pool((codes, scale, zero_point), out_scale, out_zero_point)[0]


@pytest.mark.parametrize("size,out_scale", [(1, 0.011), (2, 0.011), (7, 0.011), (2, 0.04)],
                         ids=["1x1", "2x2", "7x7", "2x2_ties"])
@pytest.mark.quick
def test_pooling_gives_qlinearglobalaveragepool_codes(size, out_scale):
    """The last case requantizes by exactly 1/4: half the sums fall on ties, which round to even."""
    codes = random_codes((3, 40, size, size))
    scale, zero_point, out_scale, out_zero_point = f32(0.04), 17, f32(out_scale), 3
    ours = _Pool()(*(Tensor(v) for v in (codes.astype(f32), scale, f32(zero_point), out_scale,
                                         f32(out_zero_point)))).asnumpy()
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "xs", "xz", "ys", "yz"], ["y"],
                            domain="com.microsoft", channels_last=0)
    theirs = ort_run(node, {"x": codes}, dict(xs=scale, xz=np.uint8(zero_point), ys=out_scale,
                                              yz=np.uint8(out_zero_point)))
    np.testing.assert_array_equal(ours, theirs.reshape(3, 40))


class _Quantize(nn.Cell):
    def construct(self, x, scale, zero_point):
        return integer.quantize(x, scale, zero_point)[0]


@pytest.mark.quick
def test_input_quantization_gives_quantizelinear_codes():
    """Including exact ties (half to even) and values beyond the range (saturated)."""
    scale, zero_point = f32(0.0173), 117
    x = np.concatenate([rng.normal(0, 1.5, 4000), (np.arange(-140, 140) + 0.5) * scale, [-1e3, 1e3]]).astype(f32)
    x = x.reshape(1, 1, 1, -1)
    ours = _Quantize()(Tensor(x), Tensor(scale), Tensor(f32(zero_point))).asnumpy()
    np.testing.assert_array_equal(ours, _ort_quantize(x, scale, zero_point))


def _ort_quantize(x, scale, zero_point):
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(np.asarray(scale), "s"),
                               numpy_helper.from_array(np.uint8(zero_point), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_8bit_network_gives_onnx_runtime_logits(learned_float, learning_data, tmp_path):
    """8-bit weights end to end, through the scripts: PTQ of the learned float network, INT8 ONNX export, and the
    checkpoint's evaluation against ONNX Runtime's, image for image (7 bits: tests/test_export.py and the import
    chain)."""
    if not cpu_has_vnni():
        pytest.skip("8-bit weights: ONNX Runtime's AVX2 kernels (no VNNI) saturate 16-bit pair sums")
    import export as export_script
    import train as train_script
    train_path, val_path = learning_data
    ptq = train_script.main(["--mode", "ptq", "--pre_trained", learned_float, "--dataset_path", train_path,
                             *learned_argv(weight_bits=8), "--calibration_batches", "4",
                             "--save_checkpoint_path", str(tmp_path / "ptq")])
    onnx_model = export_script.main(["--ckpt_file", ptq, "--file_format", "ONNX", *learned_argv(weight_bits=8),
                                     "--file_name", str(tmp_path / "int8")])
    parity = evaluate_learned(ptq, val_path, "--parity_with", onnx_model)
    assert parity["acc_a"] > 0.9  # a network that has learned, so its logits differ from image to image
    assert parity["top1_agreement"] == 1 and parity["max_logit_diff_steps"] == 0


def test_4bit_network_gives_onnx_runtime_logits(learned_float, learning_data, tmp_path, capsys):
    """4-bit weights and activations end to end: PTQ of the learned float network, INT8 ONNX export (4-bit codes in
    int8/uint8, the activations' code bounds as integer Clips of the codes, the network's edges at 8 bits), the
    checkpoint's integer inference against ONNX Runtime's, image for image, and every convolution on ORT's integer
    kernels; simulated evaluation (fake quantization) gives those logits too."""
    import collections
    import onnx
    from onnx import numpy_helper
    import export as export_script
    import train as train_script
    train_path, val_path = learning_data
    bits = learned_argv(weight_bits=4, act_bits=4)
    ptq = train_script.main(["--mode", "ptq", "--pre_trained", learned_float, "--dataset_path", train_path, *bits,
                             "--calibration_batches", "4", "--save_checkpoint_path", str(tmp_path / "ptq")])
    onnx_model = export_script.main(["--ckpt_file", ptq, "--file_format", "ONNX", *bits,
                                     "--file_name", str(tmp_path / "w4a4")])
    # LiteRT's int8 kernels clamp to int8 and ReLU6 only: 4-bit activations are refused, naming the layer
    with pytest.raises(SystemExit, match="TFLITE export writes 8-bit activations; .* is quantized to codes "
                                         "\\[0, 15\\]"):
        export_script.main(["--ckpt_file", ptq, "--file_format", "TFLITE", *bits, "--file_name", str(tmp_path / "t")])
    assert not (tmp_path / "t.tflite").exists()
    parity = evaluate_learned(ptq, val_path, "--parity_with", onnx_model)
    assert parity["acc_a"] > 0.5  # logits that differ from image to image
    assert parity["top1_agreement"] == 1 and parity["max_logit_diff_steps"] == 0
    # Fake quantization (training's arithmetic) rounds the bias as the deployed int32 bias is rounded: it computes
    # the deployed model too, up to float summation order.
    simulated = evaluate_learned(ptq, val_path, "--simulated", "--parity_with", onnx_model)
    with capsys.disabled():
        print(f"W4A4 simulated vs ONNX Runtime: top-1 agreement {simulated['top1_agreement']:.4f}, largest logit "
              f"difference {simulated['max_logit_diff_steps']:.0f} steps")
    assert simulated["top1_agreement"] >= 0.99 and simulated["max_logit_diff_steps"] <= 2
    graph = onnx.load(onnx_model).graph
    # the weight size export reports: the int8 tensors the convolutions dequantize as weights, half as much packed
    producers = {node.output[0]: node for node in graph.node}
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = [tensors[producers[node.input[1]].input[0]] for node in graph.node if node.op_type == "Conv"]
    assert weights and all(w.dtype == np.int8 for w in weights)
    stored, packed = sum(w.size for w in weights), sum(-(-w.size // 2) for w in weights)
    reported = [line for line in capsys.readouterr().out.splitlines() if line.startswith("weights:")]
    assert reported == [f"weights: {stored} bytes as int8 codes; {packed} bytes packed at their bit widths "
                        f"(4 bits)"]
    # every activation 4 bits, its codes clipped, but the network's edges: 8 bits, uint8 as they are
    clipped = {node.input[0] for node in graph.node if node.op_type == "Clip"}
    unclipped = [node.output[0].rsplit("_", 1)[0] for node in graph.node
                 if node.op_type == "QuantizeLinear" and node.output[0] not in clipped]
    assert sorted(unclipped) == ["classifier_q", "pool_q", "quantize_input_q"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    fused = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert fused["QLinearConv"] == len(weights) and fused["Conv"] == 0
