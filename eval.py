"""Evaluate a float or quantized MobileNetV2 checkpoint: top-1 and top-5 over every image of a dataset.

    python eval.py --device_target CPU --dataset_path ~/imagenet/val --checkpoint_path mobilenetV2_quant-60_1601.ckpt
The network (float or quantized, classes, width) is read from the checkpoint; --network checks it.
"""
import os
import sys

import mindspore as ms

from src import checkpoint
from src.config import parse_args, print_config
from src.dataset import DatasetError, create_dataset
from src.evaluation import evaluate, network_predictor
from src.mobilenetV2 import network_from_config


def add_args(parser):
    parser.add_argument("--dataset_path", required=True, help="evaluation images, one folder per class")
    parser.add_argument("--checkpoint_path", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--network", choices=(checkpoint.FLOAT, checkpoint.QUANT), default=None,
                        help="the kind of network expected in the checkpoint (checked)")


def load_network(path, config, expected_kind=None):
    """The network a checkpoint holds, with its weights; config gets the checkpoint's classes and width."""
    _, meta = checkpoint.read(path)
    kind = meta["network_kind"]
    if expected_kind and kind != expected_kind:
        raise checkpoint.CheckpointError(f"--network {expected_kind} given, but {path} holds a {kind} network")
    for key in ("num_classes", "width_mult"):
        if key in meta:
            config[key] = type(config[key])(meta[key])
    network = network_from_config(config, quantized=kind == checkpoint.QUANT)
    checkpoint.load_into(network, path)
    return network


def main(argv=None):
    args, config = parse_args(__doc__, add_args, argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    try:
        network = load_network(args.checkpoint_path, config, args.network)
        print_config(config)
        data = create_dataset(args.dataset_path, False, config)
        result = evaluate(network_predictor(network, config.batch_size), data)
    except (DatasetError, checkpoint.CheckpointError) as err:
        sys.exit(f"error: {err}")
    print(f"result:{result} ckpt={os.path.basename(args.checkpoint_path)}")
    return result


if __name__ == "__main__":
    main()
