"""Our CPU kernels (src/kernels) against MindSpore's own ops, in GRAPH mode: values and gradients."""
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops, Tensor

from conftest import Forward
import src.kernels as kernels
from src.kernels import DirectConv2D, cpu_kernel_library, min_max_op, stock_convolution, use_mindspore_ops
from src.mobilenetV2 import mobilenet_v2
from src.quant.quantizer import QuantConfig
from src.quant.schedule import QuantSchedule

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


def test_network_on_our_kernels_equals_network_on_mindspore_ops(library):
    """The kernels are used where they should be, and `use_mindspore_ops` (export) swaps them all out without
    changing what the network computes, in training (observers, BN statistics) and in evaluation."""
    networks = []
    for _ in range(2):
        ms.set_seed(3)
        networks.append(mobilenet_v2(num_classes=5, width_mult=0.25, quant_config=QuantConfig()))
    ours, stock = networks
    use_mindspore_ops(stock)
    stem, first_pointwise = ours.features[0], ours.features[1].conv[1]
    assert isinstance(stem.conv, DirectConv2D) and isinstance(first_pointwise.conv, ops.Conv2D)
    assert ours.input_quant.fake_quant.kernels is not None and ours.input_quant.observer.min_max is not None
    assert isinstance(stock.features[0].conv, ops.Conv2D) and stock.input_quant.fake_quant.kernels is None
    assert stock.input_quant.observer.min_max is None
    x = Tensor(np.random.default_rng(1).normal(0, 1, (4, 3, 32, 32)).astype(f32))
    outputs = []
    for network in networks:
        QuantSchedule(quant_delay=0).apply(network, 0)
        train = Forward(network)
        train.set_train(True)
        in_training = train(x).asnumpy()
        network.set_train(False)
        outputs.append((in_training, network(x).asnumpy(), {p.name: p.asnumpy() for p in network.get_parameters()}))
    (ours_train, ours_eval, ours_state), (stock_train, stock_eval, stock_state) = outputs
    np.testing.assert_allclose(ours_train, stock_train, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_eval, stock_eval, rtol=1e-4, atol=1e-4)
    for name, value in ours_state.items():  # observed ranges and running statistics
        np.testing.assert_allclose(value, stock_state[name], rtol=1e-4, atol=1e-5, err_msg=name)


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


def test_without_a_compiler_the_network_runs_on_mindspore_ops_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing compiled there yet
    monkeypatch.setattr(kernels, "COMPILE", ["no-such-compiler-here"] + kernels.COMPILE[1:])
    monkeypatch.setattr(kernels, "_library_path", None)
    with pytest.warns(UserWarning, match="could not compile the CPU kernels.*no-such-compiler-here.*Install g"):
        assert cpu_kernel_library() is None
    network = mobilenet_v2(num_classes=5, width_mult=0.25, quant_config=QuantConfig())
    assert isinstance(network.features[0].conv, ops.Conv2D) and network.input_quant.fake_quant.kernels is None
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind


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


class _Stats(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, y):
        return self.op(y)


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


@pytest.mark.parametrize("activation", [True, False], ids=["relu6", "linear"])
@pytest.mark.parametrize("rounding", [True, False], ids=["rounding", "no-rounding"])
def test_affine_act_fake_quant_kernel_is_the_ops_bits(library, activation, rounding):
    """act(a * y + b) fake-quantized, in one pass: the same bits as MindSpore's ops, the observer's range taken from
    y's channel extremes equal to the output's own min and max, and the same gradients for y, a and b."""
    from src.quant.quantizer import activation_quantizer
    rng = np.random.default_rng(6)
    y = rng.normal(0.5, 2.0, (4, 6, 9, 11)).astype(f32)
    a = rng.normal(0, 1.5, 6).astype(f32)  # some negative: their channel's ends swap
    b = rng.normal(0, 1, 6).astype(f32)
    extremes = np.stack([y.min((0, 2, 3)), y.max((0, 2, 3))])
    inputs = [Tensor(v) for v in (y, a, b, extremes)]
    results = []
    for kernels in (True, False):
        quantizer = activation_quantizer(QuantConfig())
        if not kernels:
            use_mindspore_ops(quantizer)
        assert (quantizer.fake_quant.affine_act_kernel is not None) == kernels
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
    import subprocess
    import sys
    from conftest import ROOT
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)


def test_importing_src_first_makes_openmp_threads_sleep_between_kernels():
    """Spinning OpenMP threads took a core from MindSpore's ops (training 25-30% slower): importing src before
    MindSpore sets the passive policy; importing it after says the policy came too late; a user's own is kept."""
    shown = "import os, src; import mindspore; print(os.environ['OMP_WAIT_POLICY'])"
    assert _python(shown).stdout.split()[-1] == "PASSIVE"
    late = _python("import mindspore, src")
    assert "mindspore was imported before src" in late.stderr and "OMP_WAIT_POLICY=PASSIVE" in late.stderr
    kept = _python("import os; os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'; import src; print(os.environ['OMP_WAIT_POLICY'])")
    assert kept.stdout.split()[-1] == "ACTIVE" and "imported before src" not in kept.stderr
