"""LiteRT on ARM against LiteRT on x86 for one .tflite model, on a dataset's evaluation images
(scripts/run_litert_arm.sh runs the ARM side under qemu-aarch64).

    python -m src.targets.arm_parity prepare MODEL.tflite DATASET_PATH OUT_DIR   # OUT_DIR/inputs.npy, x86.npy
    python -m src.targets.arm_parity compare OUT_DIR                              # x86.npy against arm.npy
"""
import os
import sys

import numpy as np

from src.targets.litert_run import TfliteRunner, main as run_litert


def prepare(model, dataset_path, out_dir, batch_size=32):
    """The evaluation pipeline's images for `model`'s input size, NHWC, as OUT_DIR/inputs.npy, and LiteRT's x86
    logits for them as OUT_DIR/x86.npy."""
    from easydict import EasyDict
    from src.config import config_cpu
    from src.dataset import Epoch, create_dataset
    runner = TfliteRunner(model)
    (height, width), classes = runner.size, int(runner.interpreter.get_output_details()[0]["shape"][-1])
    config = EasyDict(config_cpu, image_height=height, image_width=width, batch_size=int(batch_size),
                      num_classes=classes, num_parallel_workers=1)
    images = np.concatenate([batch for batch, _ in Epoch(create_dataset(dataset_path, False, config))])
    os.makedirs(out_dir, exist_ok=True)
    inputs = os.path.join(out_dir, "inputs.npy")
    np.save(inputs, images.transpose(0, 2, 3, 1))
    run_litert(model, inputs, os.path.join(out_dir, "x86.npy"))


def compare(out_dir):
    """Whether ARM's logits are x86's, bit for bit; prints how many differ otherwise."""
    x86, arm = (np.load(os.path.join(out_dir, f"{name}.npy")) for name in ("x86", "arm"))
    differing = int(np.sum(x86 != arm))
    print(f"LiteRT on ARM vs x86: {len(x86)} images, {x86.size} logits, {differing} differ"
          + ("" if differing else ": identical"))
    return differing == 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "prepare":
        prepare(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "compare":
        sys.exit(0 if compare(sys.argv[2]) else 1)
    else:
        sys.exit(__doc__)
