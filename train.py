"""Train MobileNetV2: quantization-aware training from a float checkpoint (the default), float training, or
post-training quantization (calibration only, the baseline QAT is measured against).

    python train.py --device_target CPU --dataset_path ~/imagenet/train --pre_trained mobilenetV2_float.ckpt
    python train.py --mode float --dataset_path ~/imagenet/train --start_epoch 0 --epoch_size 200
    python train.py --mode ptq --dataset_path ~/imagenet/train --pre_trained mobilenetV2_float.ckpt
    python train.py --dataset_path ~/imagenet/train --pre_trained mobilenetV2_float.ckpt --bits_plan bits_plan.json
Any config key (src/config.py) can be overridden: --batch_size 64 --lr 0.05 ...
"""
import os
import sys

import src  # noqa: F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP
import mindspore as ms
from mindspore.communication import GlobalComm, get_group_size, get_rank, init

from src.config import parse_args, parse_bool, print_config
from src.dataset import DatasetError
from src.checkpoint import CheckpointError
from src.quant import bits_plan
from src.trainer import calibrate, train, TrainingError


def add_args(parser):
    parser.add_argument("--dataset_path", required=True, help="training images, one folder per class")
    parser.add_argument("--mode", choices=("qat", "float", "ptq"), default="qat",
                        help="qat: quantization-aware training; float: float training; ptq: calibrate the observers "
                             "of --pre_trained on --calibration_batches batches, no training")
    parser.add_argument("--pre_trained", default=None,
                        help="float checkpoint to start QAT, PTQ (required) or float training from")
    parser.add_argument("--reinit_classifier", type=parse_bool, nargs="?", const=True, default=False,
                        help="start a new classifier (--num_classes of them) instead of loading --pre_trained's: "
                             "fine-tuning onto your own classes")
    parser.add_argument("--eval_dataset_path", default=None,
                        help="validation images, one folder per class: top-1/top-5 every --eval_interval epochs, "
                             "the best network kept as <prefix>-best.ckpt")
    parser.add_argument("--bits_plan", default=None,
                        help="a mixed-precision plan (analyze.py --weight_bits_budget writes one): the weight bits of "
                             "the layers it names; the others take its weight_bits")
    parser.add_argument("--resume", default=None,
                        help="continue a run exactly from one of its checkpoints ('latest': the newest one)")
    parser.add_argument("--run_distribute", type=parse_bool, default=False,
                        help="data parallel over the processes msrun started (HCCL on Ascend, NCCL on GPU, "
                             "MindSpore's own collectives on CPU)")


def init_data_parallel():
    """Join the collective group msrun set up; gradients are averaged over ranks, activation ranges and BN
    statistics agreed. On CPU, MindSpore's kernels get the rank's thread budget, OMP_NUM_THREADS (src/launch.py
    sets it). Returns (rank, group size, communication group)."""
    threads = os.environ.get("OMP_NUM_THREADS") if ms.get_context("device_target") == "CPU" else None
    if threads:
        ms.device_context.cpu.op_tuning.threads_num(int(threads))
    init()
    rank, group_size = get_rank(), get_group_size()
    # the process id lets src/launch.py name the rank msrun saw fail
    print(f"rank {rank} of {group_size} (process {os.getpid()})"
          + (f": {threads} CPU threads (OMP_NUM_THREADS)" if threads else ""), flush=True)
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return rank, group_size, GlobalComm.WORLD_COMM_GROUP


def main(argv=None):
    args, config = parse_args(__doc__, add_args, argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    if args.mode == "ptq" and (args.pre_trained is None or args.resume or args.run_distribute):
        sys.exit("error: --mode ptq calibrates the float checkpoint --pre_trained on one device: give "
                 "--pre_trained, and no --resume or --run_distribute")
    if args.bits_plan:
        if args.mode == "float":
            sys.exit("error: --bits_plan sets quantized layers' bit widths; --mode float has none")
        try:
            weight_bits, config.layer_weight_bits = bits_plan.read(args.bits_plan)
        except bits_plan.BitsPlanError as err:
            sys.exit(f"error: {err}")
        if "weight_bits" in args.config_given and config.weight_bits != weight_bits:
            sys.exit(f"error: --bits_plan {args.bits_plan} was made for --weight_bits {weight_bits} (the layers it "
                     f"does not name take it), this command gives --weight_bits {config.weight_bits}")
        config.weight_bits = weight_bits
    rank, group_size, group = init_data_parallel() if args.run_distribute else (0, 1, None)
    if rank == 0:
        print_config(config)
    try:
        if args.mode == "ptq":
            last = calibrate(config, args.dataset_path, args.pre_trained)
        else:
            last = train(config, args.dataset_path, quantized=args.mode == "qat", pretrained=args.pre_trained,
                         resume=args.resume, reinit_classifier=args.reinit_classifier, rank=rank,
                         group_size=group_size, sync_group=group, eval_dataset_path=args.eval_dataset_path,
                         progress=sys.stdout if sys.stdout.isatty() else None)  # redirected: the plain lines
    except (DatasetError, CheckpointError, TrainingError, bits_plan.BitsPlanError) as err:
        sys.exit(f"error: {err}")
    print(f"last checkpoint: {last}")
    return last


if __name__ == "__main__":
    main()
