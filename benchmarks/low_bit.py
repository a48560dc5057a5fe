"""Low-bit accuracy on the embedded demo data: for each bit plan (weights/activations), PTQ (calibration only), QAT
with min/max ranges and QAT with learned step sizes (LSQ), all from one float checkpoint, evaluated by integer
inference; the LSQ model is exported to INT8 ONNX and its parity with the checkpoint measured. The float network is
also trained on as long as QAT, at its learning rate: a float checkpoint that has not converged gains from those
epochs too, and QAT's accuracy is to be read against that. Prints a table and writes the figures, with the CPU
and the date, as JSON.

    python benchmarks/low_bit.py [--output_path ./low_bit_run] [--bits 4/8,4/4] [--mixed 3:4.0/8] [--float_checkpoint F]
--mixed W:B/A adds mixed-precision plans: analyze.py's plan from the float checkpoint at W-bit weights, widening
layers to 7 bits within B bits a weight on average, with A-bit activations. The float checkpoint, when not given,
is trained as demo.py trains it. --methods picks among PTQ and the two QATs, --seed seeds the QAT runs,
--width_mult and --image_size shrink the network (a harder setting, where QAT falls short of float).
"""
import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import analyze as analyze_script  # noqa: E402
import eval as evaluate_script  # noqa: E402
import export as export_script  # noqa: E402
import train as train_script  # noqa: E402
from benchmarks.benchmark import cpu_info  # noqa: E402
from demo import DEMO_CONFIG, run  # noqa: E402
from src.config import parse_bool  # noqa: E402
from src.demo_data import generate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_path", default="./low_bit_run")
    parser.add_argument("--bits", default="4/8,4/4", help="weight/activation bits, comma-separated")
    parser.add_argument("--mixed", default="", help="mixed-precision plans, weight bits:budget/activation bits, "
                                                     "comma-separated (e.g. 3:4.0/8)")
    parser.add_argument("--float_checkpoint", default=None)
    parser.add_argument("--float_epochs", type=int, default=20)
    parser.add_argument("--qat_epochs", type=int, default=10)
    parser.add_argument("--qat_lr", type=float, default=0.005, help="QAT learning rate")
    parser.add_argument("--qat_lr_end", type=float, default=None,
                        help="QAT: cosine decay from --qat_lr to this (default: --qat_lr, a constant rate)")
    parser.add_argument("--freeze_bn_epochs", type=int, default=None,
                        help="QAT: epochs before BN freezes (default: --qat_epochs - 1, the last epoch frozen); LSQ's "
                             "BN freezes by --lsq_observer_epochs, when its step sizes start learning")
    parser.add_argument("--bn_reestimation_batches", type=int, default=0,
                        help="QAT: batches over which BN statistics are re-estimated before BN freezes (0: none)")
    parser.add_argument("--oscillation_dampening", type=float, default=0.0,
                        help="QAT: weight of the oscillation-dampening penalty (0: none)")
    parser.add_argument("--edge_act_bits", type=int, default=8,
                        help="bits of the network's input, the classifier's input and the logits")
    parser.add_argument("--lsq_observer_epochs", type=int, default=1,
                        help="LSQ: epochs of observed ranges before the step sizes are learned")
    parser.add_argument("--methods", default="ptq,minmax,lsq",
                        help="which of ptq, minmax (QAT), lsq (QAT) to run for each plan, comma-separated")
    parser.add_argument("--seed", type=int, default=1, help="seed of the QAT runs (data order, augmentation)")
    parser.add_argument("--width_mult", type=float, default=0.35, help="the network's width (demo.py's: 0.35)")
    parser.add_argument("--image_size", type=int, default=56, help="the network's input size (demo.py's: 56)")
    parser.add_argument("--float_further", type=parse_bool, default=True,
                        help="train the float checkpoint on as long as QAT, for reference")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - {"ptq", "minmax", "lsq"}
    if unknown:
        parser.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose from ptq, minmax, lsq")
    start = time.time()
    # demo.py's network and data, at the width and input size asked for (later options win).
    network = [*DEMO_CONFIG, "--width_mult", str(args.width_mult), "--image_height", str(args.image_size),
               "--image_width", str(args.image_size)]
    lr_end = args.qat_lr if args.qat_lr_end is None else args.qat_lr_end
    freeze_bn = args.qat_epochs - 1 if args.freeze_bn_epochs is None else args.freeze_bn_epochs
    # LSQ: BN frozen by the time the step sizes start learning (the trainer warns otherwise; measured in the README).
    lsq_freeze_bn = min(freeze_bn, args.lsq_observer_epochs)
    train_path, val_path = generate(os.path.join(args.output_path, "data"))
    float_ckpt = args.float_checkpoint or run(train_script, [
        "--mode", "float", "--dataset_path", train_path, *network, "--warmup_epochs", "2", "--lr", "0.05",
        "--start_epoch", "0", "--epoch_size", str(args.float_epochs), "--keep_checkpoint_max", "1",
        "--save_checkpoint_path", os.path.join(args.output_path, "float")])
    evaluate = lambda path, *extra: run(evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", path,
                                                          *network, *extra])
    further = ["--dataset_path", train_path, "--pre_trained", float_ckpt, *network, "--start_epoch", "0",
               "--epoch_size", str(args.qat_epochs), "--lr", str(args.qat_lr), "--lr_end", str(lr_end),
               "--keep_checkpoint_max", "1"]
    results = {"cpu": cpu_info(), "date": datetime.date.today().isoformat(), "qat_epochs": args.qat_epochs,
               "qat_lr": args.qat_lr, "qat_lr_end": lr_end, "freeze_bn_epochs": freeze_bn,
               "lsq_freeze_bn_epochs": lsq_freeze_bn,
               "bn_reestimation_batches": args.bn_reestimation_batches,
               "oscillation_dampening": args.oscillation_dampening, "edge_act_bits": args.edge_act_bits,
               "seed": args.seed, "width_mult": args.width_mult, "image_size": args.image_size,
               "float": evaluate(float_ckpt)["acc"], "plans": {}}
    if args.float_further:
        # The float network trained on as QAT trains it: what QAT's extra epochs are worth without quantization.
        float_further = run(train_script, ["--mode", "float", *further,
                                           "--save_checkpoint_path", os.path.join(args.output_path, "float_further")])
        results["float_trained_further"] = evaluate(float_further)["acc"]
    qat = [*further, "--ema_decay", "0.99", "--bn_reestimation_batches", str(args.bn_reestimation_batches),
           "--oscillation_dampening", str(args.oscillation_dampening), "--seed", str(args.seed)]
    edges = ["--edge_act_bits", str(args.edge_act_bits)]
    plans = []
    for plan in (p for p in args.bits.split(",") if p):
        weight_bits, act_bits = plan.split("/")
        plans.append((plan, f"w{weight_bits}a{act_bits}",
                      ["--weight_bits", weight_bits, "--act_bits", act_bits, *edges]))
    for mixed in (m for m in args.mixed.split(",") if m):
        weight_bits, rest = mixed.split(":")
        budget, act_bits = rest.split("/")
        report = os.path.join(args.output_path, f"plan_w{weight_bits}_{budget}")
        plan_path = report + ".json"
        run(analyze_script, ["--checkpoint_path", float_ckpt, "--dataset_path", train_path, *network,
                             "--weight_bits", weight_bits, "--act_bits", act_bits, "--batches", "8",
                             "--weight_bits_budget", budget, "--bits_plan_output", plan_path,
                             "--report", report + ".md", "--output", report + ".png"])
        with open(plan_path) as f:
            average = json.load(f)["average_weight_bits"]
        plans.append((f"{weight_bits}-7 ({average:.2f} on average)/{act_bits}", f"w{weight_bits}_{budget}",
                      ["--bits_plan", plan_path, "--act_bits", act_bits, *edges]))
    for plan, name, bits in plans:
        folder = os.path.join(args.output_path, name)
        figures = results["plans"][plan] = {}
        if "ptq" in methods:
            ptq = run(train_script, ["--mode", "ptq", "--dataset_path", train_path, "--pre_trained", float_ckpt,
                                     *network, *bits, "--calibration_batches", "10",
                                     "--save_checkpoint_path", os.path.join(folder, "ptq")])
            figures["ptq"] = evaluate(ptq)["acc"]
        if "minmax" in methods:
            minmax = run(train_script, [*qat, *bits, "--freeze_bn_epochs", str(freeze_bn),
                                        "--freeze_observer_epochs", str(args.qat_epochs - 1),
                                        "--save_checkpoint_path", os.path.join(folder, "qat_minmax")])
            figures["qat_minmax"] = evaluate(minmax)["acc"]
            # Training's own arithmetic (fake quantization) against the deployed model's.
            figures["qat_minmax_simulated"] = evaluate(minmax, "--simulated")["acc"]
        if "lsq" in methods:
            lsq = run(train_script, [*qat, *bits, "--quantizer", "lsq",
                                     "--freeze_observer_epochs", str(args.lsq_observer_epochs),
                                     "--freeze_bn_epochs", str(lsq_freeze_bn),
                                     "--save_checkpoint_path", os.path.join(folder, "qat_lsq")])
            onnx_model = run(export_script, ["--ckpt_file", lsq, "--file_format", "ONNX", *network,
                                             "--file_name", os.path.join(folder, "lsq_int8")])
            parity = evaluate(lsq, "--parity_with", onnx_model)
            figures["qat_lsq"], figures["lsq_onnx_logit_steps"] = parity["acc_a"], parity["max_logit_diff_steps"]
        results["minutes"] = round((time.time() - start) / 60, 1)
        # Written after each plan, so that a stopped run keeps the plans it finished.
        with open(os.path.join(args.output_path, "low_bit.json"), "w") as f:
            json.dump(results, f, indent=2)
    reference = (f", trained {args.qat_epochs} epochs further as QAT trains {results['float_trained_further']:.2%}"
                 if args.float_further else "")
    print(f"\n{results['cpu']['model']} ({', '.join(results['cpu']['extensions'])}), {results['date']}; MobileNetV2 "
          f"{args.width_mult} at {args.image_size}x{args.image_size}; float {results['float']:.2%}{reference}")
    print("| bits (w/a) | PTQ | QAT minmax | QAT minmax, simulated | QAT LSQ | LSQ vs ONNX (logit steps) |\n"
          "|---|---|---|---|---|---|")
    cell = lambda r, key, fmt: fmt.format(r[key]) if key in r else "-"
    for plan, r in results["plans"].items():
        print(f"| {plan} | " + " | ".join(cell(r, key, "{:.2%}") for key in ("ptq", "qat_minmax",
                                                                               "qat_minmax_simulated", "qat_lsq"))
              + f" | {cell(r, 'lsq_onnx_logit_steps', '{:.0f}')} |")


if __name__ == "__main__":
    main()
