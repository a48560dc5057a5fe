"""Per-layer quantization sensitivity: top-1 and logit SQNR with each quantized tensor alone quantized.

    python analyze.py --checkpoint_path mobilenetV2_quant-60_1601.ckpt --dataset_path ~/imagenet/val
    python analyze.py --checkpoint_path mobilenetV2_float-200_5004.ckpt --dataset_path ~/imagenet/val --batches 32
A quantized checkpoint is measured with its own ranges; a float one is first calibrated on the same images (as
train.py --mode ptq does). Prints a Markdown table, worst first, writes it to --report and a bar chart of the most
sensitive tensors to --output (the chart needs matplotlib). Images: the first --batches full batches.
"""
import os
import sys

import src  # noqa: F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP
import mindspore as ms
import numpy as np

from eval import load_network
from src import checkpoint
from src.config import parse_args, print_config
from src.dataset import DatasetError, Epoch, create_dataset, full_batches
from src.quant.schedule import calibrate_ranges
from src.sensitivity import draw, measure, table, worst_first


def add_args(parser):
    parser.add_argument("--checkpoint_path", required=True, help="a quantized or float checkpoint")
    parser.add_argument("--dataset_path", required=True, help="images to measure on, one folder per class")
    parser.add_argument("--batches", type=int, default=16, help="full batches of --batch_size images to use")
    parser.add_argument("--report", default="sensitivity.md", help="the Markdown table to write")
    parser.add_argument("--output", default="sensitivity.png", help="the bar chart to write (needs matplotlib)")


def main(argv=None):
    args, config = parse_args(__doc__, add_args, argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    if args.batches < 1:
        sys.exit(f"error: --batches must be at least 1, got {args.batches}")
    try:
        kind = checkpoint.read(args.checkpoint_path, only=())[1].get("network_kind", checkpoint.FLOAT)
        network = load_network(args.checkpoint_path, config, given=args.config_given, quantized=True)
        print_config(config)
        batches = list(full_batches(Epoch(create_dataset(args.dataset_path, False, config)), config.batch_size,
                                    args.batches))
    except (DatasetError, checkpoint.CheckpointError) as err:
        sys.exit(f"error: {err}")
    if not batches:
        sys.exit(f"error: {args.dataset_path} holds fewer images than one batch of {config.batch_size}: lower "
                 f"--batch_size")
    if kind == checkpoint.FLOAT:
        calibrate_ranges(network, (images for images, _ in batches))
        print(f"float checkpoint: ranges calibrated on the {len(batches)} batch(es) measured")
    images, labels = [b[0] for b in batches], np.concatenate([b[1] for b in batches])
    reference, everything, rows = measure(network, images, labels, config.batch_size)
    bits = f"{network.quant_config.weight_bits}-bit weights, {network.quant_config.act_bits}-bit activations"
    report = table(reference, everything, rows, bits, len(labels))
    print(report)
    weakest = ", ".join(row["tensor"] for row in worst_first(rows)[:3])
    print(f"weakest: {weakest}")
    with open(args.report, "w", encoding="utf-8") as f:
        f.write(report + "\n")
    try:
        draw(rows, args.output, f"{os.path.basename(args.checkpoint_path)}: {bits}")
        print(f"wrote {args.report} and {args.output}")
    except ImportError:
        print(f"wrote {args.report}; no chart: matplotlib is not installed (pip install matplotlib)")
    return reference, everything, rows


if __name__ == "__main__":
    main()
