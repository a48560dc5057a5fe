"""Our CPU kernels (src/kernels) against MindSpore's own ops, in GRAPH mode: values and gradients."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from mindspore import nn, ops, Tensor

from conftest import DEPTH, Forward
import src.kernels as kernels
from src.kernels import DirectConv2D, cpu_kernel_library, min_max_op, stock_convolution, use_mindspore_ops
from src.layers import ConvBNAct
from src.mobilenetV2 import mobilenet_v2
from src.quant.layers import QuantAdd, QuantConvBNAct, QuantDense
from src.quant.quantizer import QuantConfig, activation_quantizer
from src.quant.schedule import NEVER, QuantSchedule

f32 = np.float32


@pytest.fixture(scope="module")
def library():
    path = cpu_kernel_library()
    assert path, "the CPU kernels did not compile (see the warning): the fast CPU path is not being tested"
    return path


class _Apply(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x, weight):
        return self.op(x, weight)


class _Grads(nn.Cell):
    """(dx, dweight) of sum(sens * op(x, weight))."""

    def __init__(self, op):
        super().__init__()
        self.convolve = _Apply(op)
        self.grad = ops.GradOperation(get_all=True, sens_param=True)

    def construct(self, x, weight, sens):
        return self.grad(self.convolve)(x, weight, sens)


@pytest.mark.parametrize("in_channels,out_channels,size,kernel,stride,groups", [
    (3, 8, 17, 3, 2, 1),    # the stem: dense 3x3, stride 2, odd size
    (8, 8, 12, 3, 1, 8),    # depthwise
    (8, 8, 13, 3, 2, 8),    # depthwise, stride 2, odd size
    (6, 4, 9, 3, 2, 2),     # grouped, two channels per group
    (4, 8, 7, 3, 1, 4),     # depthwise with channel multiplier 2
    (5, 5, 11, 5, 1, 5),    # 5x5
    (4, 4, 12, 5, 2, 4),    # 5x5, stride 2: taps reach two rows before the first
    (4, 4, 11, 3, 3, 4),    # stride 3
    (4, 4, 2, 3, 2, 4),     # a 2x2 plane, stride 2 (the tests' small networks end in such planes)
    (4, 4, 1, 3, 1, 4),     # a 1x1 plane: every tap but the centre reads padding
], ids=["stem", "depthwise", "depthwise-s2", "grouped", "multiplier", "5x5", "5x5-s2", "stride-3", "plane-2x2",
        "plane-1x1"])
@pytest.mark.quick
def test_direct_convolution_matches_conv2d(library, in_channels, out_channels, size, kernel, stride, groups):
    rng = np.random.default_rng(0)
    padding = (kernel - 1) // 2
    x = Tensor(rng.normal(0, 1, (3, in_channels, size, size)).astype(f32))
    weight = Tensor(rng.normal(0, 1, (out_channels, in_channels // groups, kernel, kernel)).astype(f32))
    stock = stock_convolution(out_channels, kernel, stride, padding, groups)
    ours = DirectConv2D(library, stride, padding)
    want, got = _Apply(stock)(x, weight).asnumpy(), _Apply(ours)(x, weight).asnumpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    sens = Tensor(rng.normal(0, 1, want.shape).astype(f32))
    for got_grad, want_grad in zip(_Grads(ours)(x, weight, sens), _Grads(stock)(x, weight, sens)):
        assert got_grad.shape == want_grad.shape
        np.testing.assert_allclose(got_grad.asnumpy(), want_grad.asnumpy(), rtol=1e-4, atol=1e-4)


# Our kernels and MindSpore's ops sum in different orders (vector widths, per-thread chunks, double totals), so a
# layer's outputs agree to float32 reduction error, not bit for bit, and how far depends on the CPU. The worst-case
# error of a float32 sum of n terms is about n * UNIT_ROUNDOFF of the terms' magnitude; a quantized layer reduces
# K = fan-in terms per output (the convolution) and M = values per channel (BN's batch statistics), and BN
# normalises its output, so a layer's error is bounded by (K + M) * UNIT_ROUNDOFF of its output's range.
UNIT_ROUNDOFF = 2.0 ** -24


def reduction_tolerance(fan_in, per_channel):
    """Relative (to the output's range) float32 error bound of a layer: see above."""
    return (fan_in + per_channel) * UNIT_ROUNDOFF


class _Call(nn.Cell):
    def __init__(self, cell):
        super().__init__(auto_prefix=False)
        self.cell = cell

    def construct(self, *inputs):
        return self.cell(*inputs)


def _copy_parameters(source, target):
    values = {p.name: p.asnumpy() for p in source.get_parameters()}
    for param in target.get_parameters():
        param.set_data(Tensor(values[param.name]))


def _twins(make):
    """(ours, stock): the cell `make()` builds, on our kernels and on MindSpore's ops, with the same Parameters."""
    ours, stock = make(), make()
    use_mindspore_ops(stock)
    _copy_parameters(ours, stock)
    return ours, stock


def _state(cell):
    return {p.name: p.asnumpy() for p in cell.get_parameters() if not p.requires_grad}


def _assert_state_close(ours, stock, tolerance):
    """Observer ranges and running statistics within `tolerance` of each one's scale: a channel's spread for its
    running mean (a mean near 0 has no relative precision), the value's own magnitude otherwise."""
    for name, want in stock.items():
        if name.endswith("moving_mean"):
            scale = np.sqrt(stock[name[:-len("mean")] + "variance"].max())
        else:
            scale = max(np.abs(want).max(), 1e-30)
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=tolerance * scale, err_msg=name)


# One layer of each kind that runs on our kernels: how to build it, the input shapes it takes, and its reduction
# lengths (fan-in, values per BN channel) for those inputs.
KERNEL_LAYERS = {
    # the stem: direct convolution (dense, stride 2), channel statistics, the affine fake-quant output kernel,
    # per-channel weight fake quantization, the observer kernel
    "stem": (lambda: QuantConvBNAct(3, 8, kernel_size=3, stride=2, config=QuantConfig()), [(8, 3, 16, 16)],
             27, 8 * 8 * 8),
    "depthwise": (lambda: QuantConvBNAct(16, 16, kernel_size=3, groups=16, config=QuantConfig()),
                  [(8, 16, 16, 16)], 9, 8 * 16 * 16),
    "projection": (lambda: QuantConvBNAct(16, 8, activation=False, config=QuantConfig()), [(8, 16, 16, 16)],
                   16, 8 * 16 * 16),
    "float-depthwise": (lambda: ConvBNAct(16, 16, kernel_size=3, groups=16), [(8, 16, 16, 16)], 9, 8 * 16 * 16),
    # elementwise, or the same op on both paths (MinMax, ObserveRange and FakeQuant give the ops' bits): exact
    "residual-add": (lambda: QuantAdd(config=QuantConfig()), [(8, 8, 16, 16)] * 2, 0, 0),
    "classifier": (lambda: QuantDense(32, 5, config=QuantConfig()), [(8, 32)], 0, 0),
    "input-quantizer": (lambda: activation_quantizer(QuantConfig()), [(8, 3, 16, 16)], 0, 0),
}


@pytest.mark.quick
@pytest.mark.parametrize("kind", list(KERNEL_LAYERS))
def test_each_kernel_layer_computes_what_its_op_layer_computes(library, kind):
    """A layer on our kernels against the same layer on MindSpore's ops, same Parameters, same input, in training
    (observers and BN statistics move): rounding off, within the layer's float32 reduction error; rounding on,
    each value also within one quantization step (a value that lands near a rounding boundary may round the other
    way); exact where both paths compute the same bits."""
    make, shapes, fan_in, per_channel = KERNEL_LAYERS[kind]
    rng = np.random.default_rng(7)
    inputs = [Tensor(rng.normal(0.3, 1.5, shape).astype(f32)) for shape in shapes]
    ours, stock = _twins(make)
    assert _state(ours), kind  # the comparison of states below compares something
    calls = []
    for cell in (ours, stock):
        call = _Call(cell)
        call.set_train(True)
        calls.append(call)
    tolerance = reduction_tolerance(fan_in, per_channel)
    for rounding in (False, True):
        for cell in (ours, stock):
            QuantSchedule(quant_delay=0 if rounding else NEVER).apply(cell, 0)
        got, want = (call(*inputs).asnumpy() for call in calls)
        reduces = tolerance > 0 and hasattr(stock, "output_quant")
        step = stock.output_quant.observer.qparams()[0].asnumpy() if rounding and reduces else 0.0
        atol = tolerance * (want.max() - want.min()) + step
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"rounding {rounding}")
        _assert_state_close(_state(ours), _state(stock), tolerance)


def _conv_layer_tolerance(network, batch, size):
    """reduction_tolerance summed over the network's Conv+BN layers, for input planes size x size: BN renormalises
    each layer's output, so the layers' errors add up rather than multiply."""
    total = 0.0
    for _, cell in network.cells_and_names():
        if isinstance(cell, ConvBNAct):
            if cell.in_channels == 3:
                planes = size  # the stem: the blocks' sizes follow it in the order the cells are listed
            planes = (planes + 2 * cell.padding - cell.kernel_size) // cell.stride + 1
            total += reduction_tolerance(cell.in_channels // cell.groups * cell.kernel_size ** 2,
                                         batch * planes * planes)
    return total


def test_network_on_our_kernels_equals_network_on_mindspore_ops(library):
    """The kernels are used where they should be, and `use_mindspore_ops` (export) swaps them all out without
    changing what the network computes: in training with rounding off (observers, BN statistics) within the summed
    float32 reduction error of its layers, for a batch whose BN statistics are well conditioned (the last stage's
    2x2 planes give 64 values per channel: with 4 values, ulp differences grew to 0.1% of the logits); in integer
    inference, from the same state, bit for bit. With rounding on, a network is not compared: one code rounded
    the other way changes every layer after it by more than any float32 tolerance (each layer on its own is
    compared above)."""
    ours, stock = _twins(lambda: mobilenet_v2(5, 0.25, QuantConfig(), DEPTH))
    stem, first_pointwise = ours.features[0], ours.features[1].conv[1]
    assert isinstance(stem.conv, DirectConv2D) and isinstance(first_pointwise.conv, ops.Conv2D)
    assert ours.input_quant.fake_quant.kernels is not None and ours.input_quant.observer.min_max is not None
    assert isinstance(stock.features[0].conv, ops.Conv2D) and stock.input_quant.fake_quant.kernels is None
    assert stock.input_quant.observer.min_max is None
    batch, size = 16, 64
    x = Tensor(np.random.default_rng(1).normal(0, 1, (batch, 3, size, size)).astype(f32))
    in_training = []
    for network in (ours, stock):
        QuantSchedule(quant_delay=NEVER).apply(network, 0)
        train = Forward(network)
        train.set_train(True)
        in_training.append(train(x).asnumpy())
    tolerance = _conv_layer_tolerance(ours, batch, size)
    assert tolerance < 0.01  # tight enough to catch a wrong kernel (which misses by a good part of the range)
    got, want = in_training
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * (want.max() - want.min()))
    _assert_state_close(_state(ours), _state(stock), tolerance)
    # integer inference from one state: integer arithmetic (exact sums) on both paths
    _copy_parameters(ours, stock)
    for network in (ours, stock):
        QuantSchedule(quant_delay=0).apply(network, 0)
        network.set_train(False)
    np.testing.assert_array_equal(ours(x).asnumpy(), stock(x).asnumpy())


@pytest.mark.quick
def test_min_max_in_one_pass(library):
    x = np.random.default_rng(2).normal(0, 3, (4, 5, 6, 7)).astype(f32)
    x[1, 2, 3, 4], x[3, 4, 5, 6] = -50.0, 60.0

    class MinMax(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = min_max_op(library)

        def construct(self, value):
            return self.op(value)
    np.testing.assert_array_equal(MinMax()(Tensor(x)).asnumpy(), [-50.0, 60.0])


@pytest.mark.quick
def test_without_a_compiler_the_network_runs_on_mindspore_ops_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing compiled there yet
    monkeypatch.setattr(kernels, "COMPILE", ["no-such-compiler-here"] + kernels.COMPILE[1:])
    monkeypatch.setattr(kernels, "_library_path", None)
    with pytest.warns(UserWarning, match="could not compile the CPU kernels.*no-such-compiler-here.*Install g"):
        assert cpu_kernel_library() is None
    network = mobilenet_v2(num_classes=5, width_mult=0.25, quant_config=QuantConfig(), depth_mult=DEPTH)
    assert isinstance(network.features[0].conv, ops.Conv2D) and network.input_quant.fake_quant.kernels is None
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind


@pytest.mark.quick
def test_kernel_cache_is_keyed_by_the_instruction_sets_the_compiler_targets():
    avx2, avx512 = kernels.compiler_target("haswell"), kernels.compiler_target("skylake-avx512")
    assert "__AVX2__" in avx2 and "__AVX512F__" not in avx2 and "__AVX512F__" in avx512
    assert kernels.library_path(avx2) != kernels.library_path(avx512)
    assert kernels.library_path(avx2) == kernels.library_path(kernels.compiler_target("haswell"))
    # what -march=native targets here is what this CPU has (so a library built here says what it needs)
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    native = kernels.compiler_target()
    for flag, macro in (("avx2", "__AVX2__"), ("avx512f", "__AVX512F__"), ("avx512_vnni", "__AVX512VNNI__")):
        assert (flag in flags) == (macro in native), flag
    if cpu_kernel_library():
        assert cpu_kernel_library() == kernels.library_path(native)


def _functions_with_fused_multiply_adds(library):
    """Names of the functions in a compiled library whose machine code has an FMA instruction."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], check=True, capture_output=True,
                             text=True).stdout
    found, function = set(), None
    for line in listing.splitlines():
        header = re.match(r"[0-9a-f]+ <(.+)>:$", line)
        if header:
            function = header.group(1).split(".")[0]  # OpenMP outlines loops as <Name._omp_fn.N>
        elif re.search(r"\bv?fn?m(add|sub)[0-9]{3}", line):
            found.add(function)
    return found


@pytest.mark.quick
@pytest.mark.parametrize("march", ["haswell", "skylake-avx512"], ids=["avx2", "avx512"])
def test_fake_quant_kernels_compute_products_and_sums_apart_on_every_target(march, tmp_path):
    """fake_quant.cc must give MindSpore's Mul-then-Add bits: a multiply-add contracted into one FMA rounds once
    instead of twice. GCC contracts under -march with FMA (AVX2 and AVX-512 alike) unless told not to; checked in
    the machine code built for both targets, whichever CPU runs the test. QLinearAdd fuses on purpose (std::fma,
    as ONNX Runtime's MLAS kernel)."""
    library = str(tmp_path / f"fake_quant-{march}.so")
    compile_command = [f"-march={march}" if flag == "-march=native" else flag for flag in kernels.COMPILE]
    source = next(name for name in kernels.SOURCES if name.endswith("fake_quant.cc"))
    subprocess.run(compile_command + ["-o", library, source], check=True, capture_output=True)
    assert _functions_with_fused_multiply_adds(library) == {"QLinearAdd"}


class _Stats(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, y):
        return self.op(y)


@pytest.mark.quick
@pytest.mark.parametrize("mean", [0.0, 300.0], ids=["centred", "far-from-zero"])
def test_channel_stats_in_one_pass(library, mean):
    """Mean, biased variance, min and max per channel, against NumPy in float64 (a mean far from 0 must not cancel
    the variance away); the gradient from the mean and variance rows against MindSpore's ops."""
    from src.kernels import channel_stats_op
    from src.layers import channel_stats
    rng = np.random.default_rng(4)
    y = rng.normal(mean, 2.0, (3, 5, 37, 29)).astype(f32)  # a plane longer than the kernel's float chunks
    y[2, 1, 3, 4], y[0, 3, 0, 0] = mean - 40.0, mean + 50.0
    got = _Stats(channel_stats_op(library))(Tensor(y)).asnumpy()
    wide = y.astype(np.float64)
    np.testing.assert_allclose(got[0], wide.mean((0, 2, 3)), rtol=1e-6, atol=1e-6 * 2.0)  # 1e-6 of the std
    np.testing.assert_allclose(got[1], wide.var((0, 2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(got[2], y.min((0, 2, 3)))
    np.testing.assert_array_equal(got[3], y.max((0, 2, 3)))
    sens = np.zeros((4, 5), f32)
    sens[:2] = rng.normal(0, 1, (2, 5))
    grad = ops.GradOperation(sens_param=True)
    ours = grad(_Stats(channel_stats_op(library)))(Tensor(y), Tensor(sens)).asnumpy()
    stock = grad(_Stats(channel_stats))(Tensor(y), Tensor(sens)).asnumpy()
    np.testing.assert_allclose(ours, stock, rtol=1e-4, atol=1e-6)


class _QuantizedAffine(nn.Cell):
    """quantizer.affine_act(y, a, b, activation, channel_extremes), the output of a quantized layer."""

    def __init__(self, quantizer, activation):
        super().__init__()
        self.quantizer, self.activation = quantizer, activation

    def construct(self, y, a, b, extremes):
        return self.quantizer.affine_act(y, a, b, self.activation, extremes)


@pytest.mark.quick
@pytest.mark.parametrize("activation", [True, False], ids=["relu6", "linear"])
@pytest.mark.parametrize("rounding", [True, False], ids=["rounding", "no-rounding"])
def test_affine_act_fake_quant_kernel_is_the_ops_bits(library, activation, rounding):
    """act(a * y + b) fake-quantized, in one pass: the same bits as MindSpore's ops, the observer's range taken from
    y's channel extremes equal to the output's own min and max, and the same gradients for y, a and b."""
    rng = np.random.default_rng(6)
    y = rng.normal(0.5, 2.0, (4, 6, 9, 11)).astype(f32)
    a = rng.normal(0, 1.5, 6).astype(f32)  # some negative: their channel's ends swap
    b = rng.normal(0, 1, 6).astype(f32)
    extremes = np.stack([y.min((0, 2, 3)), y.max((0, 2, 3))])
    inputs = [Tensor(v) for v in (y, a, b, extremes)]
    results = []
    for on_kernels in (True, False):
        quantizer = activation_quantizer(QuantConfig())
        if not on_kernels:
            use_mindspore_ops(quantizer)
        assert (quantizer.fake_quant.affine_act_kernel is not None) == on_kernels
        quantizer.quant_enabled.set_data(Tensor(f32(rounding)))
        cell = _QuantizedAffine(quantizer, activation)
        cell.set_train(True)  # the observer sees this batch (its first: the range is the batch's)
        out = cell(*inputs).asnumpy()
        observed = [quantizer.observer.min_val.asnumpy().item(), quantizer.observer.max_val.asnumpy().item()]
        sens = Tensor(rng.normal(0, 1, y.shape).astype(f32)) if not results else results[0][3]
        grads = ops.GradOperation(get_all=True, sens_param=True)(cell)(*inputs, sens)
        results.append((out, observed, [g.asnumpy() for g in grads[:3]], sens))
    (ours, ours_range, ours_grads, _), (stock, stock_range, stock_grads, _) = results
    np.testing.assert_array_equal(ours, stock)
    exact = a[None, :, None, None] * y + b[None, :, None, None]  # float32: a product, then a sum
    if activation:
        exact = np.clip(exact, 0, 6)
    assert ours_range == stock_range == [min(exact.min(), 0.0), exact.max()] or \
        ours_range == stock_range == [exact.min(), exact.max()]
    assert rounding or np.array_equal(ours, exact)
    assert rounding == (not np.array_equal(ours, exact))
    for got, want in zip(ours_grads, stock_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.count_nonzero(ours_grads[0]) > 0.3 * y.size


def _python(code):
    from conftest import ROOT
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)


@pytest.mark.quick
def test_importing_src_first_makes_openmp_threads_sleep_between_kernels():
    """Spinning OpenMP threads took a core from MindSpore's ops (training 25-30% slower): importing src before
    MindSpore sets the passive policy; importing it after says the policy came too late; a user's own is kept."""
    shown = "import os, src; import mindspore; print(os.environ['OMP_WAIT_POLICY'])"
    assert _python(shown).stdout.split()[-1] == "PASSIVE"
    late = _python("import mindspore, src")
    assert "mindspore was imported before src" in late.stderr and "OMP_WAIT_POLICY=PASSIVE" in late.stderr
    kept = _python("import os; os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'; import src; print(os.environ['OMP_WAIT_POLICY'])")
    assert kept.stdout.split()[-1] == "ACTIVE" and "imported before src" not in kept.stderr
