"""Low-bit accuracy on the embedded demo data: for each bit plan (weights/activations), PTQ (calibration only), QAT
with min/max ranges and QAT with learned step sizes (LSQ), all from one float checkpoint, evaluated by integer
inference; the LSQ model is exported to INT8 ONNX and its parity with the checkpoint measured. The float network is
also trained on as long as QAT, at its learning rate: a float checkpoint that has not converged gains from those
epochs too, and QAT's accuracy is to be read against that. Prints a table and writes the figures, with the CPU
and the date, as JSON.

    python benchmarks/low_bit.py [--output_path ./low_bit_run] [--bits 4/8,4/4] [--mixed 3:4.0/8] [--float_checkpoint F]
--mixed W:B/A adds mixed-precision plans: analyze.py's plan from the float checkpoint at W-bit weights, widening
layers to 7 bits within B bits a weight on average, with A-bit activations. The float checkpoint, when not given,
is trained as demo.py trains it.
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
    parser.add_argument("--bn_reestimation_batches", type=int, default=0,
                        help="QAT: batches over which BN statistics are re-estimated before BN freezes (0: none)")
    parser.add_argument("--oscillation_dampening", type=float, default=0.0,
                        help="QAT: weight of the oscillation-dampening penalty (0: none)")
    parser.add_argument("--edge_act_bits", type=int, default=8,
                        help="bits of the network's input, the classifier's input and the logits")
    parser.add_argument("--lsq_observer_epochs", type=int, default=1,
                        help="LSQ: epochs of observed ranges before the step sizes are learned")
    args = parser.parse_args()
    start = time.time()
    lr_end = args.qat_lr if args.qat_lr_end is None else args.qat_lr_end
    train_path, val_path = generate(os.path.join(args.output_path, "data"))
    float_ckpt = args.float_checkpoint or run(train_script, [
        "--mode", "float", "--dataset_path", train_path, *DEMO_CONFIG, "--warmup_epochs", "2", "--lr", "0.05",
        "--start_epoch", "0", "--epoch_size", str(args.float_epochs), "--keep_checkpoint_max", "1",
        "--save_checkpoint_path", os.path.join(args.output_path, "float")])
    evaluate = lambda path, *extra: run(evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", path,
                                                          *DEMO_CONFIG, *extra])
    further = ["--dataset_path", train_path, "--pre_trained", float_ckpt, *DEMO_CONFIG, "--start_epoch", "0",
               "--epoch_size", str(args.qat_epochs), "--lr", str(args.qat_lr), "--lr_end", str(lr_end),
               "--keep_checkpoint_max", "1"]
    # The float network trained on as QAT trains it: what QAT's extra epochs are worth without quantization.
    float_further = run(train_script, ["--mode", "float", *further,
                                       "--save_checkpoint_path", os.path.join(args.output_path, "float_further")])
    results = {"cpu": cpu_info(), "date": datetime.date.today().isoformat(), "qat_epochs": args.qat_epochs,
               "qat_lr": args.qat_lr, "qat_lr_end": lr_end, "bn_reestimation_batches": args.bn_reestimation_batches,
               "oscillation_dampening": args.oscillation_dampening, "edge_act_bits": args.edge_act_bits,
               "float": evaluate(float_ckpt)["acc"],
               "float_trained_further": evaluate(float_further)["acc"], "plans": {}}
    qat = [*further, "--ema_decay", "0.99", "--freeze_bn_epochs", str(args.qat_epochs - 1),
           "--bn_reestimation_batches", str(args.bn_reestimation_batches),
           "--oscillation_dampening", str(args.oscillation_dampening)]
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
        run(analyze_script, ["--checkpoint_path", float_ckpt, "--dataset_path", train_path, *DEMO_CONFIG,
                             "--weight_bits", weight_bits, "--act_bits", act_bits, "--batches", "8",
                             "--weight_bits_budget", budget, "--bits_plan_output", plan_path,
                             "--report", report + ".md", "--output", report + ".png"])
        with open(plan_path) as f:
            average = json.load(f)["average_weight_bits"]
        plans.append((f"{weight_bits}-7 ({average:.2f} on average)/{act_bits}", f"w{weight_bits}_{budget}",
                      ["--bits_plan", plan_path, "--act_bits", act_bits, *edges]))
    for plan, name, bits in plans:
        folder = os.path.join(args.output_path, name)
        ptq = run(train_script, ["--mode", "ptq", "--dataset_path", train_path, "--pre_trained", float_ckpt,
                                 *DEMO_CONFIG, *bits, "--calibration_batches", "10",
                                 "--save_checkpoint_path", os.path.join(folder, "ptq")])
        minmax = run(train_script, [*qat, *bits, "--freeze_observer_epochs", str(args.qat_epochs - 1),
                                    "--save_checkpoint_path", os.path.join(folder, "qat_minmax")])
        lsq = run(train_script, [*qat, *bits, "--quantizer", "lsq",
                                 "--freeze_observer_epochs", str(args.lsq_observer_epochs),
                                 "--save_checkpoint_path", os.path.join(folder, "qat_lsq")])
        onnx_model = run(export_script, ["--ckpt_file", lsq, "--file_format", "ONNX", *DEMO_CONFIG,
                                         "--file_name", os.path.join(folder, "lsq_int8")])
        parity = evaluate(lsq, "--parity_with", onnx_model)
        results["plans"][plan] = {"ptq": evaluate(ptq)["acc"], "qat_minmax": evaluate(minmax)["acc"],
                                  "qat_lsq": parity["acc_a"], "lsq_onnx_logit_steps": parity["max_logit_diff_steps"]}
    results["minutes"] = round((time.time() - start) / 60, 1)
    with open(os.path.join(args.output_path, "low_bit.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{results['cpu']['model']} ({', '.join(results['cpu']['extensions'])}), {results['date']}; float "
          f"{100 * results['float']:.2f}%, trained {args.qat_epochs} epochs further as QAT trains "
          f"{100 * results['float_trained_further']:.2f}%")
    print("| bits (w/a) | PTQ | QAT minmax | QAT LSQ | LSQ vs ONNX (logit steps) |\n|---|---|---|---|---|")
    for plan, r in results["plans"].items():
        print(f"| {plan} | {100 * r['ptq']:.2f}% | {100 * r['qat_minmax']:.2f}% | {100 * r['qat_lsq']:.2f}% | "
              f"{r['lsq_onnx_logit_steps']:.0f} |")


if __name__ == "__main__":
    main()
