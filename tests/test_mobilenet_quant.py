"""The quantization-aware MobileNetV2: built from the float description, loaded from float checkpoints,
trained in GRAPH mode with its observers and switches, and saved with all its state."""
import os

import numpy as np
import mindspore as ms
import pytest
from easydict import EasyDict
from mindspore import Tensor

from conftest import BATCH, CLASSES, DEPTH, WIDTH, Forward, checkpoint_arrays, images, tiny_mobilenet
from src import checkpoint
from src.config import config_cpu
from src.layers import set_compute_dtype
from src.lr_generator import get_lr
from src.mobilenetV2 import mobilenet_v2
from src.quant.layers import quant_state_names, weight_layers
from src.quant.quantizer import QuantConfig
from src.quant.schedule import QuantSchedule
from src.trainer import make_loss_cell, make_optimizer, make_train_cell

f32 = np.float32


def quant_net(path=None, **config):
    net = mobilenet_v2(CLASSES, WIDTH, QuantConfig(**config), DEPTH)
    if path:
        checkpoint.load_into(net, path, allow_missing=quant_state_names(net))
    return net


@pytest.mark.parametrize("depth,blocks,weight_quantizers", [(1.0, 17, 52 + 1), (DEPTH, 8, 25 + 1)])
def test_one_description_builds_both_networks(depth, blocks, weight_quantizers):
    float_net, q_net = mobilenet_v2(CLASSES, WIDTH, depth_mult=depth), mobilenet_v2(CLASSES, WIDTH, QuantConfig(), depth)
    float_names, quant_names = set(float_net.parameters_dict()), set(q_net.parameters_dict())
    assert float_names < quant_names
    assert quant_names - float_names == set(quant_state_names(q_net))
    # inverted residual blocks (depth_mult 0.3: a block a stage, two in the fourth) + stem + last conv, each conv
    # with a per-channel weight quantizer, and the classifier's
    assert len(q_net.features) == blocks + 2
    assert sum(name.endswith("weight_quant.observer.max_abs") for name in quant_names) == weight_quantizers


@pytest.mark.quick
def test_each_quantized_layer_knows_the_quantizer_of_its_input():
    """The quantizer whose output each convolution and the classifier take: the scale their bias is rounded at."""
    net = quant_net()
    names = {id(cell): name for name, cell in net.cells_and_names()}
    inputs = {name: names[id(layer.input_quantizer[0])] for name, layer in weight_layers(net).items()}
    assert len(inputs) == 26
    assert inputs["features.0"] == "input_quant"
    assert inputs["features.1.conv.0"] == "features.0.output_quant"
    assert inputs["features.1.conv.1"] == "features.1.conv.0.output_quant"
    assert inputs["features.3.conv.0"] == "features.2.conv.2.output_quant"  # after a block without a residual
    assert inputs["features.6.conv.0"] == "features.5.add.output_quant"     # after a residual block
    assert inputs["classifier"] == "pool_quant"


def test_quantized_logits_follow_float_logits(float_checkpoint):
    """8-bit per-channel weights and 8-bit activations add noise of about step/sqrt(12) per tensor (about
    48 dB below the signal for a well-used range); over ~50 quantized tensors the logits keep a cosine
    similarity above 0.99 with the float ones. A wrong fold, scale or zero point drops it far below."""
    float_net = mobilenet_v2(CLASSES, WIDTH, depth_mult=DEPTH)
    checkpoint.load_into(float_net, float_checkpoint)
    float_net.set_train(False)
    q_net = quant_net(float_checkpoint)
    QuantSchedule(quant_delay=0, freeze_bn=0).apply(q_net, 0)  # calibrate: observers on, BN as in inference
    calibrate = Forward(q_net)
    calibrate.set_train(True)
    for seed in range(100, 104):
        calibrate(images(seed))
    q_net.set_train(False)
    x = images(999, batch=BATCH)
    want, got = float_net(x).asnumpy(), q_net(x).asnumpy()
    cosine = np.sum(want * got, 1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() > 0.99, cosine
    assert not np.array_equal(want, got)  # it did quantize


def _observer_state(params):
    """Ranges and BN statistics (not the switches) of a checkpoint's name -> array."""
    return {n: v for n, v in params.items()
            if n.endswith(("min_val", "max_val", "max_abs", "moving_mean", "moving_variance"))}


def test_observers_move_in_graph_training_and_stay_once_frozen(qat_run, tmp_path):
    """qat_run's own checkpoints: in epoch 1 (global steps 4 to 6) the activation and weight ranges and the BN
    statistics move; in epoch 2 (global steps 8 to 12), BN and observers frozen, none of them moves while the
    weights still train. (Epoch 1's validation sets the weight ranges from its final weights, as evaluation does
    while observers are on: steps 6 and 8 differ in them.) A checkpoint round-trips every Parameter, observer
    ranges and switches included."""
    last, _ = qat_run
    folder = os.path.dirname(last)
    step4, step6, step8, step12 = (
        checkpoint_arrays(path)[0]
        for path in [os.path.join(folder, f"mobilenetV2_quant-{n}.ckpt") for n in ("1_4", "1_6", "2_2")] + [last])
    before, after, frozen_start, frozen_end = (_observer_state(p) for p in (step4, step6, step8, step12))
    moved = [n for n in before if not np.array_equal(before[n], after[n])]
    assert any(n.endswith("min_val") for n in moved) and any(n.endswith("max_abs") for n in moved)
    assert any("moving_mean" in n for n in moved)
    assert step6["input_quant.observer.enabled"] == 1 and step8["input_quant.observer.enabled"] == 0
    assert [n for n in frozen_start if not np.array_equal(frozen_start[n], frozen_end[n])] == []
    assert not np.array_equal(step8["classifier.weight"], step12["classifier.weight"])  # the weights still train

    net = tiny_mobilenet(QuantConfig())
    meta = checkpoint.load_into(net, last)
    assert meta["network_kind"] == "quant" and meta["epoch_num"] == 2 and meta["step_num"] == 12
    saved = str(tmp_path / "round_trip.ckpt")
    checkpoint.save(net, saved, net, 2, 12)
    restored, _ = checkpoint_arrays(saved)
    network_names = set(net.parameters_dict())
    assert network_names <= set(step12) and network_names == set(restored)
    for name in network_names:
        np.testing.assert_array_equal(restored[name], step12[name], err_msg=name)


def test_float_checkpoint_mismatches_are_named(float_checkpoint, tmp_path):
    # another number of classes: the classifier's shape is named, and nothing is loaded
    other = mobilenet_v2(CLASSES + 2, WIDTH, QuantConfig(), DEPTH)
    before = other.features[0].weight.asnumpy().copy()
    with pytest.raises(checkpoint.CheckpointError, match=r"wrong shape \(2\): classifier.weight"):
        checkpoint.load_into(other, float_checkpoint, allow_missing=quant_state_names(other))
    np.testing.assert_array_equal(other.features[0].weight.asnumpy(), before)
    # unless the user asks to re-initialise the classifier
    checkpoint.load_into(other, float_checkpoint, allow_missing=quant_state_names(other), reinit_classifier=True)
    assert not np.array_equal(other.features[0].weight.asnumpy(), before)

    # another width: every mismatching layer named
    with pytest.raises(checkpoint.CheckpointError, match=r"wrong shape .*features\.0\.weight"):
        checkpoint.load_into(mobilenet_v2(CLASSES, 0.5, depth_mult=DEPTH), float_checkpoint)
    # a quantized network may only lack its quantization state, and a float one takes no quantizer state
    q_net = quant_net()
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \(\d+\): input_quant"):
        checkpoint.load_into(q_net, float_checkpoint)
    quant_path = str(tmp_path / "q.ckpt")
    checkpoint.save(q_net, quant_path, q_net, 0, 0)
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected \(\d+\): .*observer"):
        checkpoint.load_into(mobilenet_v2(CLASSES, WIDTH, depth_mult=DEPTH), quant_path)
    # files that are not checkpoints
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found: .*nothing.ckpt"):
        checkpoint.load_into(q_net, str(tmp_path / "nothing.ckpt"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 20)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint .*garbage.ckpt"):
        checkpoint.load_into(q_net, str(garbage))


LABELS = Tensor(np.arange(BATCH) % CLASSES, ms.int32)
CONFIG = EasyDict(dict(config_cpu, num_classes=CLASSES))


def _train_cell(net):
    return make_train_cell(net, make_optimizer(net, get_lr(0, 0, 0, 0.01, 0, 1, 4), CONFIG), CONFIG)


def test_mixed_precision_computes_convolutions_in_fp16_and_keeps_quantization_fp32(float_checkpoint):
    """One training step of the quantized network in FP16 against the FP32 loss of the same network on the same
    batch (the loss a step computes before it updates)."""
    fp32_loss = float(make_loss_cell(quant_net(float_checkpoint), CONFIG).set_train(True)(images(1), LABELS).asnumpy())
    net = quant_net(float_checkpoint)
    set_compute_dtype(net, ms.float16)
    loss, overflow, _ = _train_cell(net)(images(1), LABELS)
    assert not overflow.asnumpy()
    assert all(p.dtype == ms.float32 for p in net.get_parameters())  # FP32 master weights and observers
    # FP16 products: close to the FP32 step, and not the same computation. Percent level, not less: FP16 inputs
    # move some values across a rounding boundary of the activation quantizers (measured 1.2% to 2.1%).
    assert float(loss.asnumpy()) == pytest.approx(fp32_loss, rel=5e-2)
    assert float(loss.asnumpy()) != fp32_loss
