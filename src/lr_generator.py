"""Learning rate per step: linear warm-up from lr_init to lr_max, then cosine decay to lr_end."""
import math

import numpy as np


def get_lr(global_step, lr_init, lr_end, lr_max, warmup_epochs, total_epochs, steps_per_epoch):
    """The lr of every step from `global_step` to the end of a `total_epochs` schedule.

    A run that continues a longer schedule (QAT after `start_epoch` float epochs, as the original suite did)
    passes global_step = start_epoch * steps_per_epoch and gets the schedule's tail.
    """
    total_steps = total_epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    lr = np.empty(total_steps, np.float32)
    for i in range(total_steps):
        if i < warmup_steps:
            lr[i] = lr_init + (lr_max - lr_init) * (i + 1) / warmup_steps
        else:
            progress = (i - warmup_steps) / max(total_steps - warmup_steps, 1)
            lr[i] = lr_end + (lr_max - lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr[global_step:]
