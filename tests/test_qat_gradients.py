"""QAT trains: one training step of the quantized network moves the weights as the float network's step does.

Both networks start from the same float checkpoint, trained to convergence (conftest.learned_float), and take one
step
(`make_train_cell` + `make_optimizer`, as train.py builds them, with no weight decay and no momentum, so every
move is the step's own gradient) on the same batch of real training images. With rounding off the quantized network computes the float network's function
(BN folded, then corrected to batch statistics), so every layer's update must point the same way; with rounding
on, the straight-through gradients are those of a slightly different function: close, not equal.
Checked on our CPU kernels and on MindSpore's ops. A quantizer that cuts the gradient (an observer returning
stop_gradient(x), a kernel whose gradient is zero) leaves layers unmoved and fails here.
"""
import numpy as np
import pytest
from easydict import EasyDict
from mindspore import Tensor

from conftest import LEARNED
from src import checkpoint
from src.config import config_cpu
from src.dataset import Epoch, create_dataset
from src.kernels import use_mindspore_ops
from src.mobilenetV2 import mobilenet_v2
from src.quant.layers import quant_state_names
from src.quant.quantizer import QuantConfig
from src.quant.schedule import QuantSchedule
from src.trainer import make_optimizer, make_train_cell

PATHS = ("kernels", "mindspore_ops")
# 128 images: rounding noise in the activations averages out over the batch, the gradient's signal does not. With
# 64, the rounding-on median moved with the fixture network itself: 0.976 for one trained to 97.9%, 0.87 for another
# trained to 97.9% by the same command after a change in the order of the convolution's weight-gradient sums; with
# 128, 0.96 for the second. (It once depended on the machine too, 0.97 on an AVX2-only CPU and 0.74-0.90 on an
# AVX-512 one, when the fixture network had not learned there, 52-72% top-1 at batch 8; see conftest.LEARNED.)
CONFIG = EasyDict(dict(config_cpu, **dict(LEARNED, batch_size=128)))


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _layer_cosines(updates, reference):
    """Cosine of each layer's update (its weight, gamma and beta together) with the reference's. Per layer, not
    per Parameter: a beta that feeds only batch-normalised layers has a gradient of rounding noise (BN in training
    mode cancels a per-channel shift), and the cosine of two noises means nothing."""
    layers = {}
    for name in reference:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return {layer: _cosine(np.concatenate([updates[n].ravel() for n in names]),
                           np.concatenate([reference[n].ravel() for n in names]))
            for layer, names in layers.items()}


class _OneStep:
    """A network from the float checkpoint and its compiled training step; `updates()` restores the starting
    state (weights, optimizer, observers), takes one step and returns every trainable Parameter's change."""

    def __init__(self, path, float_checkpoint, batch, quant_config=None):
        self.batch = batch
        self.network = mobilenet_v2(CONFIG.num_classes, CONFIG.width_mult, quant_config, CONFIG.depth_mult)
        allow = quant_state_names(self.network) if quant_config else ()
        checkpoint.load_into(self.network, float_checkpoint, allow_missing=allow)
        if path == "mindspore_ops":
            use_mindspore_ops(self.network)
        # No weight decay, no momentum, a constant lr: each step's update is lr * its own gradient, whatever the
        # optimizer's state (which, once a graph has run, set_data does not reset: it lives on the device).
        config = EasyDict(dict(CONFIG, weight_decay=0.0, momentum=0.0))
        self.cell = make_train_cell(self.network, make_optimizer(self.network, np.full(4, 0.01, np.float32), config),
                                    config)
        self.start = {name: p.asnumpy().copy() for name, p in self.cell.parameters_dict().items()}

    def updates(self, rounding=None):
        for name, p in self.cell.parameters_dict().items():
            p.set_data(Tensor(self.start[name]))
        if rounding is not None:
            QuantSchedule(quant_delay=0 if rounding else 1).apply(self.network, 0)
        loss, overflow, _ = self.cell(*self.batch)
        assert np.isfinite(loss.asnumpy()) and not overflow.asnumpy()
        return {p.name: p.asnumpy() - self.start[p.name] for p in self.network.trainable_params()}


@pytest.fixture(scope="module")
def batch(learning_data):
    """128 training images (shuffled, augmented, seeded) and their labels."""
    images, labels = next(iter(Epoch(create_dataset(learning_data[0], True, CONFIG))))
    return Tensor(images), Tensor(labels)


@pytest.fixture(scope="module")
def float_updates(learned_float, batch):
    """The float network's one-step update on each path."""
    return {path: _OneStep(path, learned_float, batch).updates() for path in PATHS}


@pytest.fixture(scope="module", params=PATHS)
def steps(request, learned_float, batch, float_updates):
    quant_step = _OneStep(request.param, learned_float, batch, QuantConfig(weight_bits=8, act_bits=8))
    return float_updates[request.param], quant_step


@pytest.mark.xdist_group("qat_gradients")
def test_without_rounding_the_quantized_step_is_the_float_step(steps):
    float_updates, quant_step = steps
    quant_updates = quant_step.updates(rounding=False)
    assert set(quant_updates) == set(float_updates)
    cosines = _layer_cosines(quant_updates, float_updates)
    print("per-layer cosine, rounding off: min", min(cosines.values()))
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= 0.999, (worst, cosines[worst])


@pytest.mark.xdist_group("qat_gradients")
def test_with_rounding_every_parameter_moves_close_to_the_float_step(steps):
    float_updates, quant_step = steps
    quant_updates = quant_step.updates(rounding=True)
    unmoved = [name for name, update in quant_updates.items() if not np.any(update)]
    assert unmoved == []
    cosines = sorted(_layer_cosines(quant_updates, float_updates).values())
    print("per-layer cosine, rounding on: median", np.median(cosines), "min", cosines[0])
    # Measured on the AVX-512 machine with the fixture at 97.9% (full depth): median 0.96, worst layer 0.91, on both
    # paths. At depth 0.3 on the AVX2 AMD EPYC (2026-12-08), TEST_SEED 2 and 3: median 0.973 and 0.974, worst layer
    # 0.87-0.95.
    # A cut gradient leaves layers unmoved (above) and their cosine at 0.
    assert np.median(cosines) >= 0.9, cosines[:5]


@pytest.mark.xdist_group("qat_gradients")
def test_kernel_gradients_are_mindspore_gradients(float_updates):
    """The float step on our CPU kernels against the same step on MindSpore's ops, layer by layer."""
    kernels, stock = float_updates["kernels"], float_updates["mindspore_ops"]
    assert not [name for name, update in kernels.items() if not np.any(update)]
    cosines = _layer_cosines(kernels, stock)
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= 0.9999, (worst, cosines[worst])
