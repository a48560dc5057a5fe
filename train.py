"""Train MobileNetV2: quantization-aware training from a float checkpoint (the default), or float training.

    python train.py --device_target CPU --dataset_path ~/imagenet/train --pre_trained mobilenetV2_float.ckpt
    python train.py --mode float --dataset_path ~/imagenet/train --start_epoch 0 --epoch_size 200
Any config key (src/config.py) can be overridden: --batch_size 64 --lr 0.05 ...
"""
import sys

import mindspore as ms

from src.config import parse_args, print_config
from src.dataset import DatasetError
from src.checkpoint import CheckpointError
from src.trainer import train, TrainingError


def add_args(parser):
    parser.add_argument("--dataset_path", required=True, help="training images, one folder per class")
    parser.add_argument("--mode", choices=("qat", "float"), default="qat")
    parser.add_argument("--pre_trained", default=None, help="float checkpoint to start QAT (or float training) from")
    parser.add_argument("--reinit_classifier", action="store_true",
                        help="start from --pre_trained even if its classifier has another number of classes")
    parser.add_argument("--resume", default=None,
                        help="continue a run exactly from one of its checkpoints ('latest': the newest one)")


def main(argv=None):
    args, config = parse_args(__doc__, add_args, argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    print_config(config)
    try:
        last = train(config, args.dataset_path, quantized=args.mode == "qat", pretrained=args.pre_trained,
                     resume=args.resume, reinit_classifier=args.reinit_classifier)
    except (DatasetError, CheckpointError, TrainingError) as err:
        sys.exit(f"error: {err}")
    print(f"last checkpoint: {last}")
    return last


if __name__ == "__main__":
    main()
