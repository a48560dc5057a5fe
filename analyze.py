"""Per-layer quantization sensitivity: top-1 and logit SQNR with each quantized tensor alone quantized.

    python analyze.py --checkpoint_path mobilenetV2_quant-60_1601.ckpt --dataset_path ~/imagenet/val
    python analyze.py --checkpoint_path mobilenetV2_float-200_5004.ckpt --dataset_path ~/imagenet/val --batches 32
    python analyze.py --checkpoint_path mobilenetV2_float-200_5004.ckpt --dataset_path ~/imagenet/train \
        --weight_bits 4 --weight_bits_budget 5 --bits_plan_output bits_plan.json
A quantized checkpoint is measured with its own ranges; a float one is first calibrated on the same images (as
train.py --mode ptq does). Prints a Markdown table, worst first, writes it to --report and a bar chart of the most
sensitive tensors to --output (the chart needs matplotlib). Images: the first --batches full batches.
--weight_bits_budget B also writes a mixed-precision plan for train.py --bits_plan: the layers whose weights suffer
most at --weight_bits, worst first, get --wide_weight_bits while the average bits per weight stays within B.
"""
import os
import sys

import src  # noqa: F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP
import mindspore as ms
import numpy as np

from src import checkpoint
from src.config import parse_args, print_config
from src.dataset import DatasetError, Epoch, create_dataset, full_batches
from src.export import weight_storage
from src.quant import bits_plan
from src.quant.layers import weight_layers
from src.quant.schedule import calibrate_ranges
from src.sensitivity import draw, measure, table, worst_first


def add_args(parser):
    parser.add_argument("--checkpoint_path", required=True, help="a quantized or float checkpoint")
    parser.add_argument("--dataset_path", required=True, help="images to measure on, one folder per class")
    parser.add_argument("--batches", type=int, default=16, help="full batches of --batch_size images to use")
    parser.add_argument("--report", default="sensitivity.md", help="the Markdown table to write")
    parser.add_argument("--output", default="sensitivity.png", help="the bar chart to write (needs matplotlib)")
    parser.add_argument("--weight_bits_budget", type=float, default=None,
                        help="write a mixed-precision plan whose average bits per weight stays within this budget")
    parser.add_argument("--wide_weight_bits", type=int, default=7,
                        help="the weight bits of the layers the plan widens (7: exact on every x86 ONNX Runtime)")
    parser.add_argument("--bits_plan_output", default="bits_plan.json", help="the plan to write")


def write_plan(args, network, rows):
    """Choose and write the mixed-precision plan; returns {layer: bits}."""
    sizes = {name: layer.weight.size for name, layer in weight_layers(network).items()}
    sensitivity = {row["layer"]: row["sqnr_db"] for row in rows if row["kind"] == "weights"}
    weight_bits = network.quant_config.weight_bits
    plan = bits_plan.choose(sensitivity, sizes, weight_bits, args.wide_weight_bits, args.weight_bits_budget)
    average = bits_plan.average_weight_bits(sizes, weight_bits, plan)
    bits_plan.write(args.bits_plan_output, weight_bits, plan, budget=args.weight_bits_budget,
                    average_weight_bits=round(average, 4), source=os.path.basename(args.checkpoint_path))
    print(f"bits plan: {len(plan)} of {len(sizes)} layers at {args.wide_weight_bits} bits "
          f"({', '.join(plan) or 'none fits the budget'}), the others at {weight_bits}: {average:.2f} bits a weight "
          f"on average (budget {args.weight_bits_budget}); wrote {args.bits_plan_output}\n"
          f"train with it: python train.py --bits_plan {args.bits_plan_output} ...")
    return plan


def main(argv=None):
    args, config = parse_args(__doc__, add_args, argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    if args.batches < 1:
        sys.exit(f"error: --batches must be at least 1, got {args.batches}")
    try:
        kind = checkpoint.read(args.checkpoint_path, only=())[1].get("network_kind", checkpoint.FLOAT)
        network, config = checkpoint.load_network(args.checkpoint_path, config, given=args.config_given,
                                                  quantized=True)
        if args.weight_bits_budget is not None:
            if network.quant_config.layer_weight_bits:
                raise bits_plan.BitsPlanError(
                    f"{args.checkpoint_path} already follows a bits plan; a plan is made from a network whose "
                    f"weights all take --weight_bits (the float checkpoint, or a quantized one without a plan)")
            bits_plan.check_budget(config.weight_bits, args.wide_weight_bits, args.weight_bits_budget)
        print_config(config)
        batches = list(full_batches(Epoch(create_dataset(args.dataset_path, False, config)), config.batch_size,
                                    args.batches))
    except (DatasetError, checkpoint.CheckpointError, bits_plan.BitsPlanError) as err:
        sys.exit(f"error: {err}")
    if not batches:
        sys.exit(f"error: {args.dataset_path} holds fewer images than one batch of {config.batch_size}: lower "
                 f"--batch_size")
    if kind == checkpoint.FLOAT:
        calibrate_ranges(network, (images for images, _ in batches))
        print(f"float checkpoint: ranges calibrated on the {len(batches)} batch(es) measured")
    images, labels = [b[0] for b in batches], np.concatenate([b[1] for b in batches])
    reference, everything, rows = measure(network, images, labels, config.batch_size)
    quant = network.quant_config
    bits = f"weights at {weight_storage(network)[2]}, {quant.act_bits}-bit activations" + \
        (f" ({quant.edge_act_bits} at the network's edges)" if quant.edge_act_bits != quant.act_bits else "")
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
    if args.weight_bits_budget is not None:
        write_plan(args, network, rows)
    return reference, everything, rows


if __name__ == "__main__":
    main()
