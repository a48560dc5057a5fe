"""Export a float or quantized checkpoint to MINDIR, AIR (Ascend only), ONNX (INT8 for a quantized network, for ONNX
Runtime) or TFLITE (int8, a quantized network, for LiteRT; needs pip install ai-edge-litert).

    python export.py --ckpt_file mobilenetV2_quant-60_1601.ckpt --file_format ONNX --file_name mobilenetv2_int8
    python export.py --ckpt_file mobilenetV2_quant-60_1601.ckpt --file_format TFLITE --file_name mobilenetv2_int8
"""
import sys

import src  # noqa: F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP
import mindspore as ms

from src import checkpoint
from src.config import parse_args
from src.dataset import DatasetError
from src.export import FORMATS, ExportError, export, weight_storage


def add_args(parser):
    parser.add_argument("--ckpt_file", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--file_format", choices=FORMATS, default="MINDIR")
    parser.add_argument("--file_name", default="mobilenetv2_quant", help="output path without extension")
    parser.add_argument("--network", choices=(checkpoint.FLOAT, checkpoint.QUANT), default=checkpoint.QUANT,
                        help="the kind of network expected in the checkpoint (checked; default quant)")
    parser.add_argument("--export_batch_size", type=int, default=1,
                        help="batch size of the AIR and float ONNX graphs (MINDIR, INT8 ONNX and TFLITE take any "
                             "batch size; eval.py runs a fixed-batch ONNX model in chunks)")


def main(argv=None):
    args, config = parse_args(__doc__, add_args, argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    try:
        network, config = checkpoint.load_network(args.ckpt_file, config, args.network, args.config_given)
        path = export(network, args.file_name, args.file_format, args.export_batch_size, config.image_height,
                      config.image_width, args.device_target)
    except (checkpoint.CheckpointError, DatasetError, ExportError) as err:
        sys.exit(f"error: {err}")
    print(f"exported {args.ckpt_file} as {path}")
    if getattr(network, "quantized", False):
        stored, packed, widths = weight_storage(network)
        print(f"weights: {stored} bytes as int8 codes; {packed} bytes packed at their bit widths ({widths})")
    return path


if __name__ == "__main__":
    main()
