"""Evaluate a model on a dataset: top-1 and top-5 over every image.

    python eval.py --dataset_path ~/imagenet/val --checkpoint_path mobilenetV2_quant-60_1601.ckpt
    python eval.py --dataset_path ~/imagenet/val --checkpoint_path mobilenetv2_int8.onnx      # ONNX Runtime
    python eval.py --dataset_path ~/imagenet/val --checkpoint_path mobilenetv2_int8.tflite    # LiteRT
    python eval.py --dataset_path ~/imagenet/val --checkpoint_path mobilenetv2_quant.mindir   # exported MINDIR
    python eval.py --dataset_path ~/imagenet/val --checkpoint_path q.ckpt --parity_with mobilenetv2_int8.onnx
For a checkpoint the network (float or quantized, classes, width) and the input size it was trained at are read
from the file (--image_height/--image_width choose another size, with a warning); --network checks the kind.
A quantized checkpoint is evaluated with the deployed INT8 model's integer arithmetic, as ONNX Runtime computes its
export (src/targets); --simulated evaluates it with fake quantization in float instead (the arithmetic of
training). --parity_with runs the checkpoint and an exported model side by side and reports how far they agree;
the checkpoint's integer inference then computes as that model's runtime does (LiteRT's for a .tflite model).
"""
import os
import sys

import src  # noqa: F401  first: OpenMP's wait policy must be set before MindSpore loads OpenMP
import mindspore as ms

from src import checkpoint
from src.config import parse_args, parse_bool, print_config
from src.dataset import DatasetError, check_input_record, create_dataset
from src.evaluation import evaluate, mindir_predictor, network_predictor, parity
from src.quant.layers import set_deployment_target, set_integer_inference
from src.targets import BY_FILE_FORMAT

# The runtimes of the deployment targets, and MindSpore for MINDIR; each model's target by its file's extension.
TARGETS = {target.suffix: target for target in BY_FILE_FORMAT.values()}
EXPORTED = dict({suffix: target.predictor for suffix, target in TARGETS.items()}, **{".mindir": mindir_predictor})


def add_args(parser):
    parser.add_argument("--dataset_path", required=True, help="evaluation images, one folder per class")
    parser.add_argument("--checkpoint_path", required=True,
                        help="a checkpoint written by train.py, or a model written by export.py (.onnx, "
                             ".tflite, .mindir)")
    parser.add_argument("--network", choices=(checkpoint.FLOAT, checkpoint.QUANT), default=None,
                        help="the kind of network expected in the checkpoint (checked)")
    parser.add_argument("--parity_with", default=None,
                        help="an exported model (.onnx, .tflite, .mindir) to compare with the checkpoint, image "
                             "by image")
    parser.add_argument("--simulated", type=parse_bool, nargs="?", const=True, default=False,
                        help="a quantized checkpoint: evaluate with fake quantization in float, not with the "
                             "deployed model's integer arithmetic")


def exported_predictor(path):
    extension = os.path.splitext(path)[1].lower()
    if extension not in EXPORTED:
        raise checkpoint.CheckpointError(f"{path}: an exported model must end in {' or '.join(EXPORTED)}")
    if not os.path.isfile(path):
        raise checkpoint.CheckpointError(f"exported model not found: {path}")
    try:
        return EXPORTED[extension](path)
    except Exception as err:  # ONNX Runtime and MindSpore raise their own types for unreadable files
        raise checkpoint.CheckpointError(f"cannot load exported model {path}: {err}") from None


def main(argv=None):
    args, config = parse_args(__doc__, add_args, argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    name = os.path.basename(args.checkpoint_path)
    try:
        if args.checkpoint_path.lower().endswith(tuple(EXPORTED)):
            predict = exported_predictor(args.checkpoint_path)
            check_input_record(config, getattr(predict, "input_record", {}), args.checkpoint_path, args.config_given)
            network = None
        else:
            network, config = checkpoint.load_network(args.checkpoint_path, config, args.network, args.config_given)
            if args.simulated:
                if not network.quantized:
                    raise checkpoint.CheckpointError(f"--simulated evaluates a quantized checkpoint; {name} holds a "
                                                     f"float network")
                set_integer_inference(network, False)
            predict = network_predictor(network, config.batch_size)
        print_config(config)
        data = create_dataset(args.dataset_path, False, config)
        if args.parity_with:
            if network is None or not network.quantized:
                raise checkpoint.CheckpointError("--parity_with compares a quantized checkpoint (--checkpoint_path "
                                                 "*.ckpt) with its export")
            target = TARGETS.get(os.path.splitext(args.parity_with)[1].lower())
            if target is not None:  # the checkpoint computes as the exported model's runtime does
                set_deployment_target(network, target)
            step = float(network.classifier.output_quant.qparams()[0].asnumpy())
            result = parity(predict, exported_predictor(args.parity_with), data, step)
            arithmetic = "simulated" if args.simulated else "integer inference"
            runtime = f", integer inference as {target.runtime} computes" if target and not args.simulated else ""
            print(f"parity: {name} vs {os.path.basename(args.parity_with)} over {result['images']} images{runtime}\n"
                  f"| model | top-1 |\n|---|---|\n| {name} ({arithmetic}) | {100 * result['acc_a']:.2f}% |\n"
                  f"| {os.path.basename(args.parity_with)} (deployed) | {100 * result['acc_b']:.2f}% |\n"
                  f"top-1 agreement: {100 * result['top1_agreement']:.2f}%, largest logit difference: "
                  f"{result['max_logit_diff_steps']:.2f} output quantization steps")
            return result
        result = evaluate(predict, data)
    except (DatasetError, checkpoint.CheckpointError) as err:
        sys.exit(f"error: {err}")
    print(f"result:{result} ckpt={name}")
    return result


if __name__ == "__main__":
    main()
