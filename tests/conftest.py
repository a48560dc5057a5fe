import contextlib
import io
import os
import sys

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A tiny copy of the demo dataset: 4 classes, 20x20 pixels, 12 training and 6 validation images each."""
    from src.demo_data import generate
    root = tmp_path_factory.mktemp("demo")
    train, val = generate(str(root), train_per_class=12, val_per_class=6, image_size=20, seed=3,
                           num_classes=4)
    return train, val


TINY = dict(num_classes=4, width_mult=0.25, image_height=16, image_width=16, batch_size=8, num_parallel_workers=1,
            crop_min_scale=0.5, log_interval=100, warmup_epochs=0, ema_decay=0.9)


def tiny_argv(**overrides):
    argv = []
    for key, value in dict(TINY, **overrides).items():
        argv += [f"--{key}", str(value)]
    return argv


@pytest.fixture(scope="session")
def float_run(demo_data, tmp_path_factory):
    """A float checkpoint trained 2 epochs on the tiny demo data."""
    import train as train_script
    out = str(tmp_path_factory.mktemp("float"))
    return train_script.main(["--mode", "float", "--dataset_path", demo_data[0], *tiny_argv(), "--start_epoch", "0",
                              "--epoch_size", "2", "--lr", "0.05", "--save_checkpoint_path", out])


@pytest.fixture(scope="session")
def qat_run(demo_data, float_run, tmp_path_factory):
    """(checkpoint, log) of 2 QAT epochs from float_run through train.py, BN and observers frozen after one."""
    import train as train_script
    out = str(tmp_path_factory.mktemp("qat"))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        last = train_script.main(["--dataset_path", demo_data[0], "--pre_trained", float_run, *tiny_argv(),
                                  "--start_epoch", "2", "--epoch_size", "2", "--lr", "0.05", "--freeze_bn_epochs", "1",
                                  "--freeze_observer_epochs", "1", "--save_checkpoint_path", out,
                                  "--keep_checkpoint_max", "1"])
    return last, log.getvalue()
