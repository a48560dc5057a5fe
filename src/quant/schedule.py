"""The quantization schedule: when rounding starts, when BN statistics and observer ranges stop moving (and LSQ's
step sizes start to learn, from the ranges observed until then); and the passes that set ranges (calibration)
or BN statistics (re-estimation) without training.

The switches are 0/1 Parameters inside the layers (saved in checkpoints, so a resumed run continues in the
same state); `QuantSchedule.apply` sets them from the global step, on the host, between training steps.
"""
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor

from src.layers import BN_MOMENTUM

from src.quant.layers import QuantConvBNAct
from src.quant.observers import MovingAverageMinMaxObserver, Observer
from src.quant.quantizer import LearnedStepQuantizer, Quantizer

NEVER = 2 ** 62


def set_switches(network, kind, switch, on):
    """Set the 0/1 Parameter `switch` of every cell of type `kind` in `network`."""
    value = Tensor(1.0 if on else 0.0, ms.float32)
    for _, cell in network.cells_and_names():
        if isinstance(cell, kind):
            getattr(cell, switch).set_data(value)


@dataclass
class QuantSchedule:
    """Steps from which each switch flips; `NEVER` leaves it as it is at the start of training."""
    quant_delay: int = 0          # before this step observers watch but nothing is rounded
    freeze_bn: int = NEVER        # from this step BN uses (and keeps) its running statistics
    freeze_observer: int = NEVER  # from this step quantization ranges stay fixed (LSQ: step sizes are learned)

    def state(self, step):
        return (step >= self.quant_delay, step >= self.freeze_bn, step < self.freeze_observer)

    def warnings(self, quantizer):
        """What in this schedule is known to cost accuracy with `quantizer` ("minmax" or "lsq"), for the log."""
        if quantizer == "lsq" and self.freeze_bn > self.freeze_observer:
            # Measured: docs/quantization.md, learned step sizes.
            return ["LSQ's weight step sizes start learning before BN freezes (--freeze_observer_epochs < "
                    "--freeze_bn_epochs), while BN's moving statistics still rescale the folded weights they step: "
                    "freeze BN no later (--freeze_bn_epochs <= --freeze_observer_epochs)"]
        return []

    def __post_init__(self):
        self._applied = None  # the state last written; the first apply writes every switch

    def apply(self, network, step):
        """Set every switch of `network` (the one network this schedule drives) for `step`."""
        state = self.state(step)
        if self._applied == state:
            return state
        quantize, bn_frozen, observing = state
        set_switches(network, Quantizer, "quant_enabled", quantize)
        set_switches(network, QuantConvBNAct, "bn_frozen", bn_frozen)
        set_switches(network, Observer, "enabled", observing)
        if not observing:
            for _, cell in network.cells_and_names():
                if isinstance(cell, LearnedStepQuantizer):
                    cell.take_over_from_observer()
        self._applied = state
        return state


def calibrate_ranges(network, batches):
    """Post-training calibration of a quantized network: its observers watch every image batch of `batches` with
    BN in inference mode (running statistics, folded) and nothing rounded, no weight moving; then rounding is
    switched on and every range frozen. Returns the number of batches seen."""
    QuantSchedule(quant_delay=NEVER, freeze_bn=0).apply(network, 0)
    network.set_train(True)  # observers move only in training mode
    seen = 0
    for images in batches:
        network(Tensor(images))
        seen += 1
    QuantSchedule(quant_delay=0, freeze_bn=0, freeze_observer=0).apply(network, 0)
    network.set_train(False)
    return seen


def reestimate_bn_statistics(network, batches):
    """Replace the running statistics of every quantized convolution's BN by the mean of its batch statistics over
    `batches` (image batches), each seen by the network as it stands: current weights, quantized as configured,
    no weight, range or running statistic moving in between. Run just before BN freezes, it gives the frozen
    (folded) model the statistics of its own quantized weights, where the moving average mixes those of weights
    that have since moved (Nagel et al. 2022: oscillating low-bit weights corrupt it). Returns the batches seen."""
    layers = [cell for _, cell in network.cells_and_names() if isinstance(cell, QuantConvBNAct)]
    if any(layer.bn_frozen.asnumpy() != 0 for layer in layers):
        raise ValueError("BN statistics are re-estimated before BN freezes; this network's BN is frozen")
    # Activation ranges stay as they are; weight observers (while enabled) keep taking the current weights' range.
    observers = [cell for _, cell in network.cells_and_names() if isinstance(cell, MovingAverageMinMaxObserver)]
    observing = [observer.enabled.asnumpy().copy() for observer in observers]
    set_switches(network, MovingAverageMinMaxObserver, "enabled", False)
    running = [(layer.moving_mean.asnumpy().copy(), layer.moving_variance.asnumpy().copy()) for layer in layers]
    sums = [np.zeros((2,) + mean.shape, np.float64) for mean, _ in running]
    network.set_train(True)  # batch statistics move the running ones only in training mode
    seen = 0
    for images in batches:
        network(Tensor(images))
        for layer, (mean, variance), total in zip(layers, running, sums):
            # the pass moved each running statistic r to r + m (batch - r): the batch's is read back from it
            total[0] += mean + (layer.moving_mean.asnumpy() - mean) / BN_MOMENTUM
            total[1] += variance + (layer.moving_variance.asnumpy() - variance) / BN_MOMENTUM
            layer.moving_mean.set_data(Tensor(mean))
            layer.moving_variance.set_data(Tensor(variance))
        seen += 1
    for layer, total in zip(layers, sums):
        if seen:
            layer.moving_mean.set_data(Tensor((total[0] / seen).astype(np.float32)))
            layer.moving_variance.set_data(Tensor((total[1] / seen).astype(np.float32)))
    for observer, enabled in zip(observers, observing):
        observer.enabled.set_data(Tensor(enabled))
    return seen
