"""The whole story on the embedded demo dataset, on CPU: float training, QAT from that checkpoint, evaluation
of both, and a float vs QAT table.

    python demo.py [--output_path ./demo_run]
Each stage runs the same entry points a user runs (train.py, eval.py); their command lines are printed.
"""
import argparse
import os
import time

import eval as evaluate_script
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
    parser.add_argument("--float_epochs", type=int, default=30)
    parser.add_argument("--qat_epochs", type=int, default=5)
    args = parser.parse_args()
    start = time.time()
    train_path, val_path = generate(os.path.join(args.output_path, "data"))
    float_dir, qat_dir = (os.path.join(args.output_path, name) for name in ("float", "qat"))

    float_ckpt = run(train_script, ["--mode", "float", "--dataset_path", train_path, *DEMO_CONFIG,
                                    "--start_epoch", "0", "--epoch_size", str(args.float_epochs),
                                    "--warmup_epochs", "1", "--lr", "0.2", "--save_checkpoint_path", float_dir,
                                    "--keep_checkpoint_max", "2"])
    qat_ckpt = run(train_script, ["--dataset_path", train_path, "--pre_trained", float_ckpt, *DEMO_CONFIG,
                                  "--start_epoch", str(args.float_epochs), "--epoch_size", str(args.qat_epochs),
                                  "--warmup_epochs", "1", "--lr", "0.2", "--ema_decay", "0.99",
                                  "--freeze_bn_epochs", str(args.qat_epochs - 2),
                                  "--freeze_observer_epochs", str(args.qat_epochs - 1),
                                  "--save_checkpoint_path", qat_dir, "--keep_checkpoint_max", "2"])
    results = {name: run(evaluate_script, ["--dataset_path", val_path, "--checkpoint_path", ckpt, *DEMO_CONFIG])
               for name, ckpt in (("float", float_ckpt), ("QAT int8", qat_ckpt))}

    print(f"\n| model | top-1 | top-5 | images | checkpoint |\n|---|---|---|---|---|")
    for (name, result), ckpt in zip(results.items(), (float_ckpt, qat_ckpt)):
        print(f"| {name} | {100 * result['acc']:.2f}% | {100 * result['top5']:.2f}% | {result['images']} | {ckpt} |")
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
