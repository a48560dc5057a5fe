"""Loss and progress logging."""
import time

import mindspore as ms
from mindspore import nn, ops, Tensor


class CrossEntropySmooth(nn.LossBase):
    """Softmax cross entropy against label-smoothed one-hot targets, averaged over the batch."""

    def __init__(self, num_classes, smooth_factor=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.on_value = Tensor(1.0 - smooth_factor, ms.float32)
        self.off_value = Tensor(smooth_factor / (num_classes - 1), ms.float32)
        self.cross_entropy = nn.SoftmaxCrossEntropyWithLogits(sparse=False, reduction="mean")

    def construct(self, logits, label):
        target = ops.one_hot(label, self.num_classes, self.on_value, self.off_value)
        return self.cross_entropy(logits, target)


class Monitor:
    """Per-step and per-epoch log lines in the original suite's shape (users grep them)."""

    def __init__(self, epoch_size, steps_per_epoch, log_interval=1, log=print):
        self.epoch_size, self.steps_per_epoch = epoch_size, steps_per_epoch
        self.log_interval, self.log = log_interval, log

    def epoch_begin(self):
        self.epoch_start = time.time()
        self.losses = []

    def step_begin(self):
        self.step_start = time.time()

    def step_end(self, epoch, step, loss, lr):
        self.losses.append(loss)
        if (step + 1) % self.log_interval == 0 or step + 1 == self.steps_per_epoch:
            self.log(f"epoch: [{epoch:3d}/{self.epoch_size:3d}], step:[{step:5d}/{self.steps_per_epoch:5d}], "
                     f"loss:[{loss:5.3f}/{sum(self.losses) / len(self.losses):5.3f}], "
                     f"time:[{(time.time() - self.step_start) * 1000:5.3f}], lr:[{lr:5.3f}]")

    def epoch_end(self):
        epoch_ms = (time.time() - self.epoch_start) * 1000
        steps = max(len(self.losses), 1)
        avg = sum(self.losses) / steps
        self.log(f"epoch time: {epoch_ms:5.3f}, per step time: {epoch_ms / steps:5.3f}, avg loss: {avg:5.3f}")
        return avg
