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
    """Per-step and per-epoch log lines in the original suite's shape (users grep them), each epoch line followed
    by the images per second and the time the run has left. Given `progress` (a terminal stream), a progress bar
    per epoch takes the place of the per-step lines."""

    def __init__(self, epoch_size, steps_per_epoch, images_per_step, log_interval=1, log=print, progress=None):
        self.epoch_size, self.steps_per_epoch, self.images_per_step = epoch_size, steps_per_epoch, images_per_step
        self.log_interval, self.log, self.progress = log_interval, log, progress

    def epoch_begin(self):
        self.epoch_start = time.time()
        self.losses = []

    def step_begin(self):
        self.step_start = time.time()

    def step_end(self, epoch, step, loss, lr):
        self.losses.append(loss)
        if self.progress is not None:
            self._draw_bar(epoch, step, loss)
        elif (step + 1) % self.log_interval == 0 or step + 1 == self.steps_per_epoch:
            self.log(f"epoch: [{epoch:3d}/{self.epoch_size:3d}], step:[{step:5d}/{self.steps_per_epoch:5d}], "
                     f"loss:[{loss:5.3f}/{sum(self.losses) / len(self.losses):5.3f}], "
                     f"time:[{(time.time() - self.step_start) * 1000:5.3f}], lr:[{lr:.6f}]")

    def _draw_bar(self, epoch, step, loss, width=30):
        done = (step + 1) / self.steps_per_epoch
        bar = "#" * int(width * done) + "." * (width - int(width * done))
        self.progress.write(f"\repoch {epoch + 1}/{self.epoch_size} [{bar}] {step + 1}/{self.steps_per_epoch} "
                            f"loss {loss:.3f}, {self._images_per_second():.1f} img/s ")
        self.progress.flush()

    def _images_per_second(self):
        return len(self.losses) * self.images_per_step / max(time.time() - self.epoch_start, 1e-9)

    def epoch_end(self, epoch):
        """Logs the epoch line; returns the epoch's average loss. The time left assumes the coming epochs run at
        this one's speed (the first includes graph compilation: an overestimate then)."""
        if self.progress is not None:
            self.progress.write("\n")
        seconds = time.time() - self.epoch_start
        steps = max(len(self.losses), 1)
        avg = sum(self.losses) / steps
        left = seconds / steps * self.steps_per_epoch * (self.epoch_size - epoch - 1)
        self.log(f"epoch time: {seconds * 1000:5.3f}, per step time: {seconds * 1000 / steps:5.3f}, avg loss: "
                 f"{avg:5.3f}, {self._images_per_second():.1f} img/s, time left: {_hours_minutes_seconds(left)}")
        return avg


def _hours_minutes_seconds(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
