"""The whole story on the embedded demo dataset, on CPU: float training; post-training quantization (calibration
only) and QAT from that checkpoint; evaluation of all three; INT8 ONNX export of the QAT model and its parity with
the QAT checkpoint (and the same for an int8 .tflite model when LiteRT is installed: pip install ai-edge-litert);
and a float vs PTQ vs QAT (simulated and integer) vs deployed table.

    python demo.py [--output_path ./demo_run]
Each stage runs the same entry points a user runs (train.py, eval.py); their command lines are printed.
"""
import argparse
import importlib.util
import os
import time

import eval as evaluate_script
import export as export_script
import train as train_script
from src.demo_data import generate

# Small enough for 2 CPU cores, large enough to be a real MobileNetV2 (all 17 inverted residual blocks).
DEMO_CONFIG = ["--num_classes", "10", "--width_mult", "0.35", "--image_height", "56", "--image_width", "56",
               "--batch_size", "32", "--crop_min_scale", "0.25", "--log_interval", "25"]


def run(script, argv):
    print(f"\n$ python {script.__name__}.py {' '.join(argv)}", flush=True)
    return script.main(argv)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_path", default="./demo_run")
    parser.add_argument("--float_epochs", type=int, default=20)
    parser.add_argument("--qat_epochs", type=int, default=5)
    args = parser.parse_args()
    start = time.time()
    train_path, val_path = generate(os.path.join(args.output_path, "data"))
    float_dir, ptq_dir, qat_dir = (os.path.join(args.output_path, name) for name in ("float", "ptq", "qat"))

    # QAT continues the float run's warm-up + cosine schedule: its lr is the tail, from about 0.0025 down to 0.
    schedule = ["--warmup_epochs", "2", "--lr", "0.05", "--keep_checkpoint_max", "2"]
    float_ckpt = run(train_script, ["--mode", "float", "--dataset_path", train_path, *DEMO_CONFIG, *schedule,
                                    "--start_epoch", "0", "--epoch_size", str(args.float_epochs),
                                    "--save_checkpoint_path", float_dir])
    ptq_ckpt = run(train_script, ["--mode", "ptq", "--dataset_path", train_path, "--pre_trained", float_ckpt,
                                  *DEMO_CONFIG, "--calibration_batches", "10", "--save_checkpoint_path", ptq_dir])
    qat_ckpt = run(train_script, ["--dataset_path", train_path, "--pre_trained", float_ckpt, *DEMO_CONFIG, *schedule,
                                  "--start_epoch", str(args.float_epochs), "--epoch_size", str(args.qat_epochs),
                                  "--ema_decay", "0.99", "--freeze_bn_epochs", str(args.qat_epochs - 2),
                                  "--freeze_observer_epochs", str(args.qat_epochs - 1),
                                  "--save_checkpoint_path", qat_dir])
    onnx_model = run(export_script, ["--ckpt_file", qat_ckpt, "--file_format", "ONNX", *DEMO_CONFIG,
                                     "--file_name", os.path.join(args.output_path, "mobilenetv2_demo_int8")])
    float_result, ptq_result, qat_result, deployed = (
        run(evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", model, *DEMO_CONFIG])
        for model in (float_ckpt, ptq_ckpt, qat_ckpt, onnx_model))
    simulated = run(evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", qat_ckpt, "--simulated",
                                      *DEMO_CONFIG])
    parity = run(evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", qat_ckpt,
                                   "--parity_with", onnx_model, *DEMO_CONFIG])
    deployed_rows, parities = [("QAT, INT8 ONNX (ONNX Runtime)", deployed)], [("ONNX Runtime", parity)]
    if importlib.util.find_spec("ai_edge_litert"):
        tflite_model = run(export_script, ["--ckpt_file", qat_ckpt, "--file_format", "TFLITE", *DEMO_CONFIG,
                                           "--file_name", os.path.join(args.output_path, "mobilenetv2_demo_int8")])
        deployed_rows.append(("QAT, int8 TFLite (LiteRT, XNNPACK)", run(
            evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", tflite_model, *DEMO_CONFIG])))
        parities.append(("LiteRT", run(evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", qat_ckpt,
                                                         "--parity_with", tflite_model, *DEMO_CONFIG])))
    else:
        print("\nLiteRT is not installed: pip install ai-edge-litert adds the int8 .tflite model to this demo")

    print("\n| model | top-1 | top-5 |\n|---|---|---|")
    for name, result in (("float (MindSpore)", float_result),
                         ("PTQ, calibration only, INT8 integer inference (MindSpore)", ptq_result),
                         ("QAT, simulated: fake quantization in float (MindSpore)", simulated),
                         ("QAT, INT8 integer inference (MindSpore)", qat_result), *deployed_rows):
        print(f"| {name} | {100 * result['acc']:.2f}% | {100 * result['top5']:.2f}% |")
    print(f"\n{float_result['images']} validation images; QAT vs float: "
          f"{100 * (qat_result['acc'] - float_result['acc']):+.2f} points, PTQ vs float: "
          f"{100 * (ptq_result['acc'] - float_result['acc']):+.2f} points")
    for runtime, result in parities:
        print(f"integer inference vs {runtime}: top-1 agreement {100 * result['top1_agreement']:.2f}%, largest logit "
              f"difference {result['max_logit_diff_steps']:.2f} output quantization steps")
    print(f"demo finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
