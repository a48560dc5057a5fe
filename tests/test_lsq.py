"""Learned step sizes (--quantizer lsq): LSQ's gradient against a NumPy reference, the hand-over from the observer
(once, and not again on resume), step sizes that an optimizer trains, and a tiny LSQ run through train.py whose
integer inference is the exported ONNX model's, logit for logit."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import nn, Tensor

from conftest import checkpoint_arrays, tiny_argv, tiny_mobilenet
from src import checkpoint
from src.quant.fake_quant import LearnedStepFakeQuantize, quant_range
from src.quant.quantizer import LearnedStepQuantizer, QuantConfig, activation_quantizer, weight_quantizer
from src.quant.schedule import QuantSchedule

f32 = np.float32
LR = 0.01
LSQ = QuantConfig(weight_bits=3, act_bits=4, ema_decay=0.5, quantizer="lsq")


def reference_lsq(x, scale, zero_point, qmin, qmax, upstream, channel_axis=None):
    """(output, d/dx, d/dscale) of LSQ's fake quantization for the loss sum(output * upstream)."""
    v = x / scale
    q = np.round(v) + zero_point
    inside = (q >= qmin) & (q <= qmax)
    out = (np.clip(q, qmin, qmax) - zero_point) * scale
    dq_dscale = np.where(inside, np.round(v) - v, np.where(q < qmin, qmin - zero_point, qmax - zero_point))
    axes = tuple(a for a in range(x.ndim) if a != channel_axis)
    shared = x.size // np.size(scale) if channel_axis is not None else x.size // x.shape[0]  # per image
    dscale = (upstream * dq_dscale).sum(axis=axes, keepdims=channel_axis is not None) / np.sqrt(shared * qmax)
    return out, upstream * inside, dscale


class _WeightedSum(nn.Cell):
    """sum(cell(*inputs) * upstream): its gradient for the cell's output is `upstream`."""

    def __init__(self, cell, upstream):
        super().__init__()
        self.cell, self.upstream = cell, Tensor(upstream)

    def construct(self, *inputs):
        return (self.cell(*inputs) * self.upstream).sum()


@pytest.mark.quick
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_learned_step_gradient_is_lsqs(per_channel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5, 5)).astype(f32) * 2
    upstream = rng.normal(size=x.shape).astype(f32)
    if per_channel:
        (qmin, qmax), axis = quant_range(3, signed=True, narrow_range=True), 0
        scale = np.array([0.2, 0.5, 0.9, 1.5], f32).reshape(4, 1, 1, 1)
        zero_point = np.zeros_like(scale)
    else:
        (qmin, qmax), axis = quant_range(4, signed=False), None
        scale, zero_point = f32(0.3), f32(7)
    want, want_dx, want_dscale = reference_lsq(x, scale, zero_point, qmin, qmax, upstream, axis)
    quantize = LearnedStepFakeQuantize(qmin, qmax)
    args = Tensor(x), Tensor(scale), Tensor(zero_point)
    np.testing.assert_array_equal(quantize(*args, Tensor(f32(1))).asnumpy(), want.astype(f32))
    grad = ms.grad(_WeightedSum(quantize, upstream), grad_position=(0, 1))
    dx, dscale = grad(*args, Tensor(f32(1)))
    np.testing.assert_array_equal(dx.asnumpy(), want_dx)
    assert dscale.shape == np.shape(scale) and np.abs(want_dscale).min() > 0
    np.testing.assert_allclose(dscale.asnumpy(), want_dscale, rtol=1e-5, atol=1e-6)
    # rounding off (before the quantization delay ends): the identity, and nothing for the scale to learn
    dx, dscale = grad(*args, Tensor(f32(0)))
    np.testing.assert_array_equal(dx.asnumpy(), upstream)
    np.testing.assert_array_equal(dscale.asnumpy(), np.zeros(np.shape(scale), f32))


def _switches(quantizer):
    return quantizer.learned.asnumpy().item(), quantizer.observer.enabled.asnumpy().item()


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["weights", "activations"])
def test_step_size_takes_over_from_the_observer_once_then_the_optimizer_trains_it(kind):
    rng = np.random.default_rng(1)
    if kind == "weights":
        x = rng.normal(size=(3, 2, 3, 3)).astype(f32) * np.array([0.5, 1.0, 2.0], f32).reshape(3, 1, 1, 1)
        quantizer, axis = weight_quantizer(LSQ, x.shape), 0
    else:
        x = rng.normal(size=(4, 3, 6, 6)).astype(f32)
        quantizer, axis = activation_quantizer(LSQ), None
    assert isinstance(quantizer, LearnedStepQuantizer)
    upstream = rng.normal(size=x.shape).astype(f32)
    train = nn.TrainOneStepCell(_WeightedSum(quantizer, upstream),
                                nn.SGD([quantizer.step_size], learning_rate=LR))
    train.set_train(True)
    schedule = QuantSchedule(quant_delay=0, freeze_observer=2)
    for step in range(2):  # the observer's range gives the scale; the step size gets no gradient
        schedule.apply(quantizer, step)
        train(Tensor(x))
        np.testing.assert_array_equal(quantizer.step_size.asnumpy(), np.ones(quantizer.step_size.shape, f32))
    assert _switches(quantizer) == (0, 1)
    observed_scale, zero_point = (t.asnumpy() for t in quantizer.observer.qparams())
    schedule.apply(quantizer, 2)
    assert _switches(quantizer) == (1, 0)
    np.testing.assert_array_equal(quantizer.step_size.asnumpy(), observed_scale)
    # One step of SGD on the step size: LSQ's gradient, from the observed scale.
    train(Tensor(x))
    _, _, dscale = reference_lsq(x, observed_scale, zero_point, quantizer.qmin, quantizer.qmax, upstream, axis)
    learned = quantizer.step_size.asnumpy().copy()
    assert np.all(learned != observed_scale)
    np.testing.assert_allclose(learned, observed_scale - LR * dscale, rtol=1e-5)
    # Resumed with the step size learned (a fresh schedule writes every switch): the step size is kept, not taken
    # from the observer again; integer inference and export read it.
    QuantSchedule(quant_delay=0, freeze_observer=2).apply(quantizer, 3)
    np.testing.assert_array_equal(quantizer.step_size.asnumpy(), learned)
    np.testing.assert_array_equal(quantizer.qparams()[0].asnumpy(), learned)


@pytest.mark.quick
def test_a_step_size_carried_across_zero_keeps_quantizing_and_learning():
    """An update can carry a small channel's step size below 0; its magnitude stays the scale (integer inference and
    export read the same), and it keeps a gradient, so the channel is not quantized to 0 for good."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 2, 3, 3)).astype(f32)
    quantizer = weight_quantizer(LSQ, x.shape)
    step = np.array([0.4, -0.3, 0.5], f32).reshape(3, 1, 1, 1)
    quantizer.step_size.set_data(Tensor(step))
    quantizer.learned.set_data(Tensor(f32(1)))
    quantizer.observer.enabled.set_data(Tensor(f32(0)))
    np.testing.assert_array_equal(quantizer.qparams()[0].asnumpy(), np.abs(step))
    upstream = rng.normal(size=x.shape).astype(f32)
    want, _, _ = reference_lsq(x, np.abs(step), np.zeros_like(step), quantizer.qmin, quantizer.qmax, upstream, 0)
    np.testing.assert_array_equal(quantizer(Tensor(x)).asnumpy(), want)
    dstep = ms.grad(_WeightedSum(quantizer, upstream), grad_position=None, weights=[quantizer.step_size])(Tensor(x))
    assert np.all(dstep[0].asnumpy() != 0)


@pytest.mark.quick
def test_a_schedule_that_learns_weight_step_sizes_before_bn_freezes_is_warned_of():
    """LSQ's weight step sizes learned while BN's moving statistics still rescale the folded weights: measured to
    cost accuracy (docs/quantization.md), so the log says so; not for min/max, not once BN freezes in time."""
    assert QuantSchedule(freeze_bn=90, freeze_observer=10).warnings("lsq")
    assert not QuantSchedule(freeze_bn=90, freeze_observer=10).warnings("minmax")
    assert not QuantSchedule(freeze_bn=10, freeze_observer=10).warnings("lsq")
    assert not QuantSchedule(freeze_bn=10).warnings("lsq")  # observers never freeze: no step size is learned


def test_lsq_run_learns_step_sizes_and_deploys_exactly(demo_data, float_run, tmp_path, capsys):
    """train.py --quantizer lsq from float_run: 2 epochs, the observers' ranges in the first, step sizes learned
    in the second. The checkpoint says it is LSQ and holds every step size with its optimizer state; eval.py builds
    the LSQ network from it, and its integer inference gives ONNX Runtime's logits, image for image."""
    import eval as eval_script
    import export as export_script
    import train as train_script
    argv = ["--dataset_path", demo_data[0], "--pre_trained", float_run, *tiny_argv(), "--start_epoch", "2",
            "--epoch_size", "2", "--lr", "0.05", "--freeze_bn_epochs", "1", "--freeze_observer_epochs", "1",
            "--quantizer", "lsq", "--save_checkpoint_path", str(tmp_path)]
    last = train_script.main(argv)
    log = capsys.readouterr().out
    assert "checkpoint saved" in log and "warning: LSQ" not in log  # BN freezes as the step sizes start
    params, meta = checkpoint_arrays(last)
    assert meta["quantizer"] == "lsq"
    first_epoch, _ = checkpoint_arrays(str(tmp_path / "mobilenetV2_quant-1_6.ckpt"))
    steps = [name for name in params if name.endswith(".step_size") and not name.startswith("moments.")]
    assert len(steps) == len([name for name in params if name.endswith(".quant_enabled")]) > 50
    assert all(params[name.replace("step_size", "learned")] == 1 for name in steps)
    assert all(f"moments.{name}" in params for name in steps)
    # Taken over at the first step of epoch 2 (after epoch 1's checkpoint), then trained: all but a few moved.
    assert all(first_epoch[name.replace("step_size", "learned")] == 0 for name in steps)
    bits = QuantConfig(meta["weight_bits"], meta["act_bits"], quantizer="lsq")
    network = tiny_mobilenet(bits)
    checkpoint.load_into(network, last)
    quantizers = [(name, cell) for name, cell in network.cells_and_names() if isinstance(cell, LearnedStepQuantizer)]
    assert len(quantizers) == len(steps)
    moved = [name for name, cell in quantizers
             if not np.array_equal(cell.step_size.asnumpy(), cell.observer.qparams()[0].asnumpy())]
    assert len(moved) > 0.9 * len(quantizers) and any(".weight_quant" in name for name in moved)

    with pytest.raises(SystemExit, match="was trained with quantizer lsq, this run asks for minmax: give --quantizer lsq"):
        train_script.main([*argv[:-4], "--save_checkpoint_path", str(tmp_path), "--resume", "latest"])

    onnx_path = export_script.main(["--ckpt_file", last, "--file_format", "ONNX", "--file_name",
                                    str(tmp_path / "lsq"), *tiny_argv()])
    result = eval_script.main(["--dataset_path", demo_data[1], "--checkpoint_path", last, "--parity_with", onnx_path,
                               *tiny_argv()])
    assert result["images"] == 24 and result["max_logit_diff_steps"] == 0 and result["top1_agreement"] == 1
