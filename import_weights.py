"""Import public float MobileNetV2 weights (torchvision's or timm's, .pth or .safetensors) as a float checkpoint
that train.py --pre_trained, eval.py and export.py take like one train.py wrote.

    python import_weights.py --input mobilenet_v2-7ebf99e0.pth --output mobilenetv2_imagenet.ckpt
    python import_weights.py --input model.safetensors --output mobilenetv2_100_timm.ckpt
Width and number of classes are read from the shapes; a file that is not such a MobileNetV2 stops with what
does not fit, and nothing is written.
"""
import argparse
import sys

import src  # noqa: F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP
import mindspore as ms

from src.checkpoint import CheckpointError
from src.import_weights import WeightImportError, import_weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--input", required=True, help="torchvision or timm MobileNetV2 weights (.pth, .safetensors)")
    parser.add_argument("--output", required=True, help="the float checkpoint to write (.ckpt; must not exist)")
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    try:
        import_weights(args.input, args.output)
    except (WeightImportError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    print(f"float checkpoint written: {args.output}")
    return args.output


if __name__ == "__main__":
    main()
