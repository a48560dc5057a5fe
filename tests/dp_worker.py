"""Worker for the data-parallel test: a few QAT steps of a tiny MobileNetV2 on a fixed global batch, either in
one process (--single) or as one of the ranks msrun started (each rank takes its slice of the batch).
Writes every Parameter of the network to <out>/<rank or 'single'>.npz; ranks then take one more step with BN
statistics moving and write every Parameter again to <out>/rank<rank>_bn_moving.npz, then re-estimate BN statistics
over two batches of their slices and write them to <out>/rank<rank>_bn_reestimated.npz."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import src  # noqa: E402,F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from easydict import EasyDict  # noqa: E402

import train as train_script  # noqa: E402
from src import checkpoint  # noqa: E402
from src.config import config_cpu  # noqa: E402
from src.lr_generator import get_lr  # noqa: E402
from src.mobilenetV2 import network_from_config  # noqa: E402
from src.quant.layers import QuantConvBNAct, quant_state_names  # noqa: E402
from src.quant.schedule import QuantSchedule, reestimate_bn_statistics, set_switches  # noqa: E402
from src.trainer import make_optimizer, make_train_cell  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--pre_trained", required=True, help="a float checkpoint with realistic BN statistics")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    rank, group_size, group = (0, 1, None) if args.single else train_script.init_data_parallel()
    depth = checkpoint.read(args.pre_trained)[1]["depth_mult"]
    config = EasyDict(dict(config_cpu, num_classes=5, width_mult=0.25, depth_mult=depth, ema_decay=0.5))
    ms.set_seed(0)
    network = network_from_config(config, quantized=True, sync_group=group)
    checkpoint.load_into(network, args.pre_trained, allow_missing=quant_state_names(network))
    train_cell = make_train_cell(network, make_optimizer(network, get_lr(0, 0, 0, 0.05, 0, 1, STEPS + 1), config),
                                 config)
    if args.single:
        np.savez(os.path.join(args.out, "start.npz"), **{p.name: p.asnumpy() for p in network.get_parameters()})
    # BN frozen from the start: batch statistics would differ between a rank's half batch and the whole batch
    QuantSchedule(quant_delay=0, freeze_bn=0).apply(network, 0)
    rng = np.random.default_rng(7)
    per_rank = GLOBAL_BATCH // group_size

    part = slice(rank * per_rank, (rank + 1) * per_rank)

    def step():
        images = rng.normal(0, 1, (GLOBAL_BATCH, 3, 16, 16)).astype(np.float32)
        labels = rng.integers(0, 5, GLOBAL_BATCH).astype(np.int32)
        train_cell(ms.Tensor(images[part]), ms.Tensor(labels[part]))

    def save(name):
        np.savez(os.path.join(args.out, name + ".npz"), **{p.name: p.asnumpy() for p in network.get_parameters()})
    for _ in range(STEPS):
        step()
    save("single" if args.single else f"rank{rank}")
    if not args.single:
        set_switches(network, QuantConvBNAct, "bn_frozen", False)
        step()
        save(f"rank{rank}_bn_moving")
        reestimate_bn_statistics(network, (rng.normal(0, 1, (GLOBAL_BATCH, 3, 16, 16)).astype(np.float32)[part]
                                           for _ in range(2)))
        save(f"rank{rank}_bn_reestimated")


if __name__ == "__main__":
    main()
