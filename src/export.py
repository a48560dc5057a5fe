"""Export a trained checkpoint for deployment: MINDIR (MindSpore, any target), AIR (Ascend 310 inference, needs
Ascend), ONNX (INT8 QDQ for ONNX Runtime; float networks export as FP32) and TFLITE (int8 for LiteRT); the integer
formats are written by their deployment targets (src/targets)."""
import mindspore as ms
import numpy as np
from mindspore import Tensor

from src.kernels import use_mindspore_ops
from src.targets import BY_FILE_FORMAT
from src.quant.layers import weight_layers
from src.quant.observers import Observer
from src.quant.schedule import set_switches

FORMATS = ("MINDIR", "AIR", "ONNX", "TFLITE")


class ExportError(ValueError):
    pass


def freeze_ranges(network, image_height, image_width):
    """Fix every quantization range as inference uses it: one inference pass sets the weight ranges of the
    current weights (as evaluation does), then all observers stop, so the exported graph holds constants."""
    network.set_train(False)  # weight ranges as evaluation computes them; activation ranges left as trained
    network(Tensor(np.zeros((1, 3, image_height, image_width), np.float32)))
    set_switches(network, Observer, "enabled", False)


def weight_storage(network):
    """How a quantized network's convolution and dense weights are stored: (bytes as the INT8 ONNX model stores
    them, one int8 per code; bytes packed at each layer's code width, e.g. two 4-bit codes a byte; a description
    of the bit widths, e.g. "4 bits" or "4.31 bits a weight on average: 49 layers at 4 bits, 4 at 7")."""
    stored = packed = 0
    layers = {}  # code bits: (layers, weights)
    for _, cell in weight_layers(network).items():
        bits, size = cell.weight_quant.code_bits, cell.weight.size
        stored += size
        packed += -(-size * bits // 8)
        count, weights = layers.get(bits, (0, 0))
        layers[bits] = (count + 1, weights + size)
    if len(layers) == 1:
        return stored, packed, f"{next(iter(layers))} bits"
    average = sum(bits * weights for bits, (_, weights) in layers.items()) / stored
    widths = ", ".join(f"{count} layer{'s' * (count != 1)} at {bits} bits"
                       for bits, (count, _) in sorted(layers.items()))
    return stored, packed, f"{average:.2f} bits a weight on average: {widths}"


def export(network, file_name, file_format, batch_size, image_height, image_width, device_target):
    """Write `network` as `file_name` + the format's extension; returns the path written."""
    if file_format == "AIR" and device_target != "Ascend":
        raise ExportError(f"AIR export needs the Ascend backend (--device_target Ascend on an Ascend machine); on "
                          f"{device_target} export MINDIR for MindSpore or ONNX for ONNX Runtime instead")
    quantized = getattr(network, "quantized", False)
    if file_format == "TFLITE" and not quantized:
        raise ExportError("TFLITE export writes int8 models of quantized networks; this checkpoint holds a float "
                          "network: quantize it first (train.py --mode ptq or QAT)")
    network.set_train(False)
    if quantized:
        freeze_ranges(network, image_height, image_width)
    if file_format in BY_FILE_FORMAT and quantized:
        target = BY_FILE_FORMAT[file_format]
        path = file_name + target.suffix
        try:
            target.export(network, path, (3, image_height, image_width))
        except (ValueError, ImportError) as err:  # what the network or this machine lacks for the format
            raise ExportError(str(err)) from None
        return path
    if file_format in ("AIR", "ONNX"):  # Ascend 310 graphs, and MindSpore's ONNX export, take a fixed batch size
        example = Tensor(np.zeros((batch_size, 3, image_height, image_width), np.float32))
    else:
        example = Tensor(shape=[None, 3, image_height, image_width], dtype=ms.float32)  # any batch size
    use_mindspore_ops(network)
    ms.export(network, example, file_name=file_name, file_format=file_format)
    return f"{file_name}.{file_format.lower()}"
