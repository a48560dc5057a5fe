"""The quantization mechanism against NumPy references of the same arithmetic, in GRAPH mode. Per-tensor fake
quantization and the min/max observer are tested both ways they run: our CPU kernels and MindSpore ops."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import nn, ops, Tensor

from conftest import Forward
from src import kernels
from src.kernels import stock_convolution
from src.layers import ConvBNAct, BN_EPS, BN_MOMENTUM
from src.quant.fake_quant import FakeQuantize, quant_range
from src.quant.layers import QuantConvBNAct
from src.quant.observers import asymmetric_qparams, MovingAverageMinMaxObserver, PerChannelAbsMaxObserver
from src.quant.quantizer import QuantConfig, weight_quantizer
from src.quant.schedule import QuantSchedule

pytestmark = pytest.mark.quick  # the developer's loop: python -m pytest -q -m quick tests

f32 = np.float32


@pytest.fixture(params=["cpu_kernels", "mindspore_ops"])
def implementation(request, monkeypatch):
    if request.param == "mindspore_ops":
        monkeypatch.setattr(kernels, "cpu_kernel_library", lambda: None)  # where every cell asks for its kernels
    return request.param


def per_tensor_fake_quant(qmin, qmax, implementation):
    quantizer = FakeQuantize(qmin, qmax)
    assert (quantizer.kernels is not None) == (implementation == "cpu_kernels")
    return quantizer


def reference_fake_quant(x, scale, zero_point, qmin, qmax):
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)  # np.round: half to even, like ONNX
    return ((q - zero_point) * scale).astype(f32)


def reference_asymmetric(min_val, max_val, qmin, qmax):
    min_val, max_val = f32(min(min_val, 0.0)), f32(max(max_val, 0.0))
    scale = max(f32((max_val - min_val) / f32(qmax - qmin)), np.finfo(f32).eps)
    return f32(scale), f32(np.clip(np.round(qmin - min_val / scale), qmin, qmax))


def test_quant_range():
    assert quant_range(8, signed=False) == (0, 255)
    assert quant_range(8, signed=True) == (-128, 127)
    assert quant_range(8, signed=True, narrow_range=True) == (-127, 127)
    assert quant_range(2, signed=False, narrow_range=True) == (1, 3)
    with pytest.raises(ValueError, match="between 2 and 8"):
        quant_range(9, signed=True)


@pytest.mark.parametrize("num_bits,signed,narrow", [(8, False, False), (8, True, True), (4, True, False),
                                                    (2, False, True), (7, True, True)])
def test_fake_quant_matches_numpy_exactly(num_bits, signed, narrow, implementation):
    qmin, qmax = quant_range(num_bits, signed, narrow)
    rng = np.random.default_rng(num_bits)
    scale, zero_point = f32(0.05), f32(0 if signed else qmin + 3)
    # random values, exact rounding ties (k + 0.5 steps), the clamp edges and beyond
    ties = ((np.arange(qmin - 3, qmax + 3) - zero_point + 0.5) * scale).astype(f32)
    edges = ((np.array([qmin, qmax, qmin - 1, qmax + 1]) - zero_point) * scale).astype(f32)
    x = np.concatenate([rng.normal(0, 3, 500).astype(f32), ties, edges, [f32(1e6), f32(-1e6)]])
    quantizer = per_tensor_fake_quant(qmin, qmax, implementation)
    got = quantizer(Tensor(x), Tensor(scale), Tensor(zero_point), Tensor(f32(1))).asnumpy()
    want = reference_fake_quant(x, scale, zero_point, qmin, qmax)
    np.testing.assert_array_equal(got, want)
    assert got.min() >= (qmin - zero_point) * scale - 1e-6 and got.max() <= (qmax - zero_point) * scale + 1e-6
    # disabled: the identity
    off = quantizer(Tensor(x), Tensor(scale), Tensor(zero_point), Tensor(f32(0))).asnumpy()
    np.testing.assert_array_equal(off, x)


def test_rounding_ties_go_to_even(implementation):
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], f32)
    got = per_tensor_fake_quant(-128, 127, implementation)(Tensor(x), Tensor(f32(1)), Tensor(f32(0)), Tensor(f32(1))).asnumpy()
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -2])


@pytest.mark.parametrize("lo,hi", [(2.0, 5.0), (-3.0, -1.0), (-0.7, 6.3), (0.0, 0.0)])
def test_asymmetric_qparams_hold_zero_exactly(lo, hi, implementation):
    """Ranges that do not contain zero are widened to it, and the nudged zero point makes 0.0 exact."""
    qmin, qmax = 0, 255
    scale, zero_point = (t.asnumpy() for t in asymmetric_qparams(Tensor(f32(lo)), Tensor(f32(hi)), qmin, qmax))
    want_scale, want_zp = reference_asymmetric(lo, hi, qmin, qmax)
    assert scale == want_scale and zero_point == want_zp
    assert zero_point == np.round(zero_point) and qmin <= zero_point <= qmax
    x = np.array([0.0, lo, hi, (lo + hi) / 2], f32)
    got = per_tensor_fake_quant(qmin, qmax, implementation)(Tensor(x), Tensor(scale), Tensor(zero_point),
                                                            Tensor(f32(1))).asnumpy()
    assert got[0] == 0.0
    np.testing.assert_array_equal(got, reference_fake_quant(x, scale, zero_point, qmin, qmax))
    # the representable range still covers [lo, hi] to within one step
    assert abs(got[1] - lo) <= scale and abs(got[2] - hi) <= scale


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (8, 1, 3, 3), (6, 10)], ids=["conv", "depthwise", "dense"])
def test_per_channel_weight_quantizer_matches_numpy(shape, implementation):
    rng = np.random.default_rng(1)
    w = (rng.normal(0, 1, shape) * rng.uniform(0.01, 2, (shape[0],) + (1,) * (len(shape) - 1))).astype(f32)
    quantizer = weight_quantizer(QuantConfig(weight_bits=8), shape, channel_axis=0)
    assert (quantizer.fake_quant.kernels is not None) == (implementation == "cpu_kernels")
    got = quantizer(Tensor(w)).asnumpy()
    max_abs = np.abs(w).reshape(shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (len(shape) - 1))
    scale = (max_abs / f32(127)).astype(f32)
    np.testing.assert_array_equal(got, reference_fake_quant(w, scale, f32(0), -127, 127))
    # each channel uses its own scale: at most 255 distinct levels per channel, the extremes kept exactly
    for c in range(shape[0]):
        assert np.abs(got[c]).max() == pytest.approx(max_abs.ravel()[c], rel=1e-6)


def test_per_channel_gradient_is_straight_through_inside_each_channels_range(implementation):
    """A frozen weight range that no longer holds the weights: each channel passes the gradient where its own
    range held the value and stops it where the value was clamped; with rounding off it passes everywhere."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (5, 3, 3, 3)).astype(f32)
    quantizer = weight_quantizer(QuantConfig(weight_bits=4), w.shape, channel_axis=0)
    max_abs = np.array([0.2, 0.5, 1.0, 2.0, 9.0], f32).reshape(5, 1, 1, 1)
    quantizer.observer.max_abs.set_data(Tensor(max_abs))
    quantizer.observer.enabled.set_data(Tensor(f32(0)))
    grad = ops.GradOperation()(_SumOf(quantizer))
    got = grad(Tensor(w)).asnumpy()
    scale = max_abs / f32(7)
    np.testing.assert_array_equal(got, (np.abs(np.round(w / scale)) <= 7).astype(f32))
    assert 0 < got[0].mean() < got[3].mean() and got[4].min() == 1  # narrow ranges stop more
    quantizer.quant_enabled.set_data(Tensor(f32(0)))
    np.testing.assert_array_equal(ops.GradOperation()(_SumOf(quantizer))(Tensor(w)).asnumpy(), np.ones_like(w))


def test_per_channel_observer_takes_any_channel_axis():
    w = np.random.default_rng(2).normal(0, 1, (3, 3, 5, 2)).astype(f32)  # TF depthwise layout: channel last
    observer = PerChannelAbsMaxObserver(-127, 127, w.shape, channel_axis=-1)
    observer(Tensor(w))
    np.testing.assert_array_equal(observer.max_abs.asnumpy().ravel(), np.abs(w).reshape(-1, 2).max(axis=0))


class _SumOf(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, *inputs):
        return self.cell(*inputs).sum()


class _GradOfSum(nn.Cell):
    """d sum(fake_quant(x)) / dx, in GRAPH mode."""

    def __init__(self, fake_quant):
        super().__init__()
        self.sum_of = _SumOf(fake_quant)
        self.grad = ops.GradOperation()

    def construct(self, x, scale, zero_point, enabled):
        return self.grad(self.sum_of)(x, scale, zero_point, enabled)


def test_straight_through_gradient_is_one_inside_zero_outside(implementation):
    qmin, qmax = 0, 255
    scale, zero_point = f32(0.1), f32(100)  # representable range [-10.0, 15.5]
    x = np.array([-20.0, -10.04, -9.9, 0.0, 3.33, 15.5, 15.54, 15.56, 40.0], f32)
    grad = _GradOfSum(per_tensor_fake_quant(qmin, qmax, implementation))
    got = grad(Tensor(x), Tensor(scale), Tensor(zero_point), Tensor(f32(1))).asnumpy()
    np.testing.assert_array_equal(got, [0, 1, 1, 1, 1, 1, 1, 0, 0])
    # before the quantization delay ends the quantizer is the identity, and so is its gradient
    off = grad(Tensor(x), Tensor(scale), Tensor(zero_point), Tensor(f32(0))).asnumpy()
    np.testing.assert_array_equal(off, np.ones_like(x))


def test_moving_average_observer_averages_then_moves_exponentially_then_freezes(implementation):
    # ema_decay 0.6: the average's horizon is 1 / (1 - 0.6) = 2.5 batches, so two plain-mean batches, then EMA
    observer = MovingAverageMinMaxObserver(0, 255, ema_decay=0.6)
    assert (observer.min_max is not None) == (observer.range_kernel is not None) == (implementation == "cpu_kernels")
    observer.set_train(True)
    run = Forward(observer)
    run.set_train(True)
    run(Tensor(np.array([-1.0, 2.0], f32)))
    assert observer.min_val.asnumpy() == pytest.approx(-1.0) and observer.max_val.asnumpy() == pytest.approx(2.0)
    run(Tensor(np.array([-3.0, 4.0], f32)))
    assert observer.min_val.asnumpy() == pytest.approx((-1 - 3) / 2)
    assert observer.max_val.asnumpy() == pytest.approx((2 + 4) / 2)
    run(Tensor(np.array([-5.0, 12.0], f32)))  # a plain mean would keep 2/3 of the old range; the EMA keeps 0.6
    assert observer.min_val.asnumpy() == pytest.approx(0.6 * -2 + 0.4 * -5)
    assert observer.max_val.asnumpy() == pytest.approx(0.6 * 3 + 0.4 * 12)
    assert observer.batches_seen.asnumpy() == 3
    observer.enabled.set_data(Tensor(f32(0)))
    before = observer.min_val.asnumpy().copy(), observer.max_val.asnumpy().copy()
    run(Tensor(np.array([-30.0, 40.0], f32)))
    assert (observer.min_val.asnumpy(), observer.max_val.asnumpy()) == before
    run.set_train(False)
    observer.enabled.set_data(Tensor(f32(1)))
    run(Tensor(np.array([-30.0, 40.0], f32)))  # evaluation never moves activation ranges
    assert (observer.min_val.asnumpy(), observer.max_val.asnumpy()) == before


def test_observer_kernel_moves_the_range_and_gives_qparams_as_the_ops_do():
    """The one-operator observer update (CPU) against the ops it replaces: the same bits for the moved range, the
    batch count and the (scale, zero point) it returns, through the plain mean, the moving average (ema_decay 0.75:
    from the fourth batch), a frozen stretch and ranges with and without zero, at 8 and 4 bits."""
    rng = np.random.default_rng(11)
    batches = [np.sort(rng.normal(centre, spread, 2)).astype(f32)
               for centre, spread in [(0.3, 2.0), (5.0, 0.5), (-4.0, 1.0), (0.1, 3.3), (2.0, 0.01), (-0.2, 7.0),
                                      (9.0, 1.0), (0.0, 1e-3)]]
    for qmin, qmax in [(0, 255), (0, 15)]:
        results = []
        for on_kernels in (True, False):
            observer = MovingAverageMinMaxObserver(qmin, qmax, ema_decay=0.75)
            if not on_kernels:
                observer.use_mindspore_ops()
            assert (observer.range_kernel is not None) == on_kernels
            run = Forward(observer)
            run.set_train(True)
            steps = []
            for i, batch in enumerate(batches):
                observer.enabled.set_data(Tensor(f32(i not in (5, 6))))
                scale, zero_point = (t.asnumpy() for t in run(Tensor(batch)))
                state = [p.asnumpy() for p in (observer.min_val, observer.max_val, observer.batches_seen)]
                want = [t.asnumpy() for t in observer.qparams()]
                assert scale == want[0] and zero_point == want[1]  # what it returns is its new state's qparams
                steps.append([scale, zero_point] + state)
            results.append(np.array(steps))
        np.testing.assert_array_equal(results[0], results[1])
        assert results[0][-1, 4] == 6  # two batches were not counted
        assert len(set(results[0][:, 0])) == len(batches) - 2  # the range moved at every enabled batch


def _conv_pair(groups, seed=0):
    """A float ConvBNAct and a QuantConvBNAct with the same (non-trivial) parameters."""
    ms.set_seed(seed)
    float_layer = ConvBNAct(8, 8, kernel_size=3, stride=1, groups=groups)
    quant_layer = QuantConvBNAct(8, 8, kernel_size=3, stride=1, groups=groups, config=QuantConfig())
    rng = np.random.default_rng(seed)
    for name, value in (("gamma", rng.uniform(0.5, 2, 8)), ("beta", rng.normal(0, 1, 8)),
                        ("moving_mean", rng.normal(0, 1, 8)), ("moving_variance", rng.uniform(0.5, 3, 8))):
        getattr(float_layer, name).set_data(Tensor(value.astype(f32)))
        getattr(quant_layer, name).set_data(Tensor(value.astype(f32)))
    quant_layer.weight.set_data(float_layer.weight.data.copy())
    return float_layer, quant_layer


class _StockConvBN(nn.Cell):
    """The reference: MindSpore's own Conv2D, BatchNorm and ReLU6 ops on a copy of a layer's Parameters."""

    def __init__(self, layer):
        super().__init__()
        self.params = {name: ms.Parameter(Tensor(getattr(layer, name).asnumpy()), name=name)
                       for name in ("weight", "gamma", "beta", "moving_mean", "moving_variance")}
        for name, param in self.params.items():
            setattr(self, name, param)
        self.conv = stock_convolution(layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                                      layer.groups)

    def construct(self, x):
        y = ops.batch_norm(self.conv(x, self.weight), self.moving_mean, self.moving_variance, self.gamma, self.beta,
                           self.training, BN_MOMENTUM, BN_EPS)
        return ops.relu6(y)


def _run(cell, x, training):
    """cell(x) in training or inference mode (set_train reaches every sub-cell: set it before each run)."""
    forward = Forward(cell)
    forward.set_train(training)
    return forward(x).asnumpy()


@pytest.mark.parametrize("groups", [1, 8], ids=["conv", "depthwise"])
def test_float_conv_bn_is_conv_then_mindspore_batch_norm(groups):
    """The float layer's BN from channel statistics (kernels here) against MindSpore's BatchNorm: outputs in both
    modes, the running statistics training moves, and the gradients (the formulation's own: the other gradient
    tests compare it on kernels and on ops, or quantized and float, with itself)."""
    float_layer, _ = _conv_pair(groups)
    reference = _StockConvBN(float_layer)
    x = Tensor(np.random.default_rng(5).normal(0, 1, (4, 8, 10, 10)).astype(f32))
    np.testing.assert_allclose(_run(float_layer, x, False), _run(reference, x, False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(float_layer, x, True), _run(reference, x, True), rtol=1e-4, atol=1e-4)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(float_layer, name).asnumpy(), reference.params[name].asnumpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.array_equal(float_layer.moving_mean.asnumpy(), _conv_pair(groups)[0].moving_mean.asnumpy())
    # and the gradients of training mode, through the batch statistics, are BatchNorm's
    sens = Tensor(np.random.default_rng(6).normal(0, 1, (4, 8, 10, 10)).astype(f32))
    ours = _training_gradients(float_layer, x, sens)
    for name, want in _training_gradients(reference, x, sens).items():
        np.testing.assert_allclose(ours[name], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


class _WeightedSum(nn.Cell):
    def __init__(self, layer, sens):
        super().__init__()
        self.layer, self.sens = layer, sens

    def construct(self, x):
        return (self.layer(x) * self.sens).sum()


def _training_gradients(layer, x, sens):
    """Gradients of sum(sens * layer(x)) in training mode for the layer's weight, gamma and beta."""
    loss = _WeightedSum(layer, sens)
    loss.set_train(True)
    params = [layer.weight, layer.gamma, layer.beta]
    grads = ops.GradOperation(get_by_list=True)(loss, ms.ParameterTuple(params))(x)
    return {name: g.asnumpy() for name, g in zip(("weight", "gamma", "beta"), grads)}


@pytest.mark.parametrize("groups", [1, 8], ids=["conv", "depthwise"])
def test_folded_conv_bn_matches_conv_then_bn(groups):
    _, quant_layer = _conv_pair(groups)
    reference = _StockConvBN(quant_layer)
    start_mean = quant_layer.moving_mean.asnumpy().copy()
    x = Tensor(np.random.default_rng(5).normal(0, 1, (4, 8, 10, 10)).astype(f32))
    # quantization off, BN frozen: the folded layer in training mode equals conv then BN with running statistics
    quant_layer.weight_quant.quant_enabled.set_data(Tensor(f32(0)))
    quant_layer.output_quant.quant_enabled.set_data(Tensor(f32(0)))
    quant_layer.bn_frozen.set_data(Tensor(f32(1)))
    np.testing.assert_allclose(_run(quant_layer, x, True), _run(reference, x, False), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(quant_layer.moving_mean.asnumpy(), start_mean)  # frozen: not moved at all
    # BN not frozen: batch statistics, as BN in training mode, and the running statistics move alike
    quant_layer.bn_frozen.set_data(Tensor(f32(0)))
    np.testing.assert_allclose(_run(quant_layer, x, True), _run(reference, x, True), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(quant_layer.moving_mean.asnumpy(), reference.moving_mean.asnumpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(quant_layer.moving_variance.asnumpy(), reference.moving_variance.asnumpy(),
                               rtol=1e-4)
    assert not np.array_equal(quant_layer.moving_mean.asnumpy(), start_mean)


def test_folded_weights_are_what_inference_sees():
    _, quant_layer = _conv_pair(groups=1)
    folded_weight, folded_bias = (t.asnumpy() for t in quant_layer.fold())
    gamma, beta = quant_layer.gamma.asnumpy(), quant_layer.beta.asnumpy()
    mean, var = quant_layer.moving_mean.asnumpy(), quant_layer.moving_variance.asnumpy()
    std = np.sqrt(var + BN_EPS)
    np.testing.assert_allclose(folded_weight, quant_layer.weight.asnumpy() * (gamma / std)[:, None, None, None],
                               rtol=1e-6)
    np.testing.assert_allclose(folded_bias, beta - gamma * mean / std, rtol=1e-5, atol=1e-6)


def test_schedule_flips_switches_at_their_steps():
    _, layer = _conv_pair(groups=1)
    schedule = QuantSchedule(quant_delay=2, freeze_bn=3, freeze_observer=4)
    switches = lambda: (layer.weight_quant.quant_enabled.asnumpy().item(), layer.bn_frozen.asnumpy().item(),
                        layer.output_quant.observer.enabled.asnumpy().item(),
                        layer.weight_quant.observer.enabled.asnumpy().item())
    seen = []
    for step in range(5):
        schedule.apply(layer, step)
        seen.append(switches())
    assert seen == [(0, 0, 1, 1), (0, 0, 1, 1), (1, 0, 1, 1), (1, 1, 1, 1), (1, 1, 0, 0)]


def test_bn_reestimation_takes_the_mean_of_the_batch_statistics_of_the_quantized_convolution():
    """reestimate_bn_statistics against NumPy: each channel's running mean and variance become the mean over the
    batches of the batch statistics of conv(x, Wq) / fold_scale (Wq: the weights folded by the running statistics
    as they stood, quantized per channel), activation ranges untouched; a frozen BN is refused."""
    from src.quant.schedule import reestimate_bn_statistics
    _, layer = _conv_pair(groups=1)
    rng = np.random.default_rng(1)
    batches = [rng.normal(0.5, 1.0, (4, 8, 6, 6)).astype(f32) for _ in range(2)]
    gamma, mean, variance = (getattr(layer, n).asnumpy() for n in ("gamma", "moving_mean", "moving_variance"))
    fold_scale = gamma / np.sqrt(variance + f32(BN_EPS))
    folded = layer.weight.asnumpy() * fold_scale.reshape(-1, 1, 1, 1)
    scale = np.maximum(np.abs(folded).max(axis=(1, 2, 3)) / f32(127), np.finfo(f32).eps).reshape(-1, 1, 1, 1)
    quantized = np.clip(np.round(folded / scale), -127, 127) * scale
    statistics = []
    for x in batches:
        padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        patches = np.stack([padded[:, :, i:i + 6, j:j + 6] for i in range(3) for j in range(3)], axis=2)
        y = np.einsum("nckhw,ock->nohw", patches, quantized.reshape(8, 8, 9)) / fold_scale.reshape(1, -1, 1, 1)
        statistics.append((y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3), ddof=1)))
    range_before = layer.output_quant.observer.qparams()[0].asnumpy()
    assert reestimate_bn_statistics(layer, iter(batches)) == 2
    np.testing.assert_allclose(layer.moving_mean.asnumpy(), np.mean([s[0] for s in statistics], axis=0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_variance.asnumpy(), np.mean([s[1] for s in statistics], axis=0),
                               rtol=1e-4)
    assert not np.allclose(layer.moving_mean.asnumpy(), mean, atol=0.1)  # it moved, far from where it started
    np.testing.assert_array_equal(layer.output_quant.observer.qparams()[0].asnumpy(), range_before)
    assert layer.output_quant.observer.enabled.asnumpy() == 1
    layer.bn_frozen.set_data(Tensor(1.0, ms.float32))
    with pytest.raises(ValueError, match="before BN freezes; this network's BN is frozen"):
        reestimate_bn_statistics(layer, iter(batches))
