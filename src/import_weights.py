"""Public float MobileNetV2 weights as this suite's float checkpoint.

Reads torchvision's `mobilenet_v2` and timm's `mobilenetv2_*` state dicts, from `.pth` (needs torch) or
`.safetensors` (needs only the safetensors package), maps their names onto this suite's Parameter names, and
checks every name and shape against the MobileNetV2 this suite builds at the width and classes the shapes say.
Both libraries' networks match ours layer for layer: same channel rounding, symmetric 'same' padding, ReLU6,
BN eps 1e-5, ImageNet mean/std on RGB input (ours on 0-255 pixels, theirs on 0-1: the same map).
"""
import os
import re
from typing import Callable, NamedTuple

import mindspore as ms
import numpy as np

from src import checkpoint
from src.dataset import MEAN, STD
from src.layers import BN_EPS, ConvBNAct
from src.mobilenetV2 import INVERTED_RESIDUAL_SETTING, mobilenet_v2

TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
SAFETENSORS_EXTENSION = ".safetensors"
# What torchvision and timm MobileNetV2s were trained at (their published weights' evaluation transforms).
IMAGE_SIZE = 224
# Their BN layers' names for what ours calls gamma, beta and the running statistics.
BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
# Per-layer state of theirs that inference does not use.
IGNORED_SUFFIXES = (".num_batches_tracked",)
# A checkpoint of a training script wraps the state dict: the first of these keys found holds it.
WRAPPER_KEYS = ("state_dict", "model", "module")
LAST_STAGE_CHANNELS = INVERTED_RESIDUAL_SETTING[-1][1]
NUM_BLOCKS = sum(repeats for _, _, repeats, _ in INVERTED_RESIDUAL_SETTING)


class WeightImportError(ValueError):
    pass


def read_state_dict(path):
    """name -> float32 NumPy array of a `.pth` or `.safetensors` file; errors name the file and what is wrong."""
    if not os.path.isfile(path):
        raise WeightImportError(f"weights file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension == SAFETENSORS_EXTENSION:
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise WeightImportError(f"reading {path} needs the 'safetensors' package: "
                                    f"python -m pip install safetensors") from None
        try:
            state = load_file(path)
        except Exception as err:  # safetensors raises its own error types for a corrupt header
            raise WeightImportError(f"cannot read {path} as safetensors: {err}") from None
    elif extension in TORCH_EXTENSIONS:
        state = _read_torch(path)
    else:
        raise WeightImportError(f"{path}: expected a {SAFETENSORS_EXTENSION} or {'/'.join(TORCH_EXTENSIONS)} file")
    arrays = {}
    for name, value in state.items():
        if not np.issubdtype(value.dtype, np.floating) and not name.endswith(IGNORED_SUFFIXES):
            raise WeightImportError(f"{path}: {name} holds {value.dtype} values, not floating-point weights")
        arrays[name] = value.astype(np.float32)
    return arrays


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise WeightImportError(f"reading {path} needs PyTorch ('torch'); install it, or convert the weights to "
                                f"{SAFETENSORS_EXTENSION}, which needs only the 'safetensors' package") from None
    try:
        # weights_only: tensors and containers, never arbitrary pickled code from a downloaded file
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike for a bad file
        raise WeightImportError(f"cannot read {path} with torch.load: {err}") from None
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), dict)), None)
        if inner is None:
            raise WeightImportError(f"{path} holds no state dict (top-level keys: {', '.join(map(str, state))})")
        state = inner
    if not isinstance(state, dict):
        raise WeightImportError(f"{path} holds a {type(state).__name__}, not a state dict")
    # Data-parallel training (DistributedDataParallel) saves every name under "module."
    return {re.sub(r"^module\.", "", name): value.float().numpy() for name, value in state.items()
            if torch.is_tensor(value)}


def _block_stage_index(block):
    """(stage, index in stage) of inverted residual block `block` (1-based, as features.<block> numbers it)."""
    first = 1
    for stage, (_, _, repeats, _) in enumerate(INVERTED_RESIDUAL_SETTING):
        if block < first + repeats:
            return stage, block - first
        first += repeats
    raise ValueError(block)


def torchvision_layer_names(prefix, block_length):
    """(conv weight, BN prefix) of torchvision's name for our Conv+BN layer `prefix`."""
    found = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)", prefix)
    if found is None:  # the stem and the last 1x1 convolution: Conv2dNormActivation (conv, BN, ReLU6)
        return f"{prefix}.0.weight", f"{prefix}.1"
    j = int(found.group(2))
    if j < block_length - 1:
        return f"{prefix}.0.weight", f"{prefix}.1"
    # the projection: a bare Conv2d then a BatchNorm2d, one index further
    return f"{prefix}.weight", f"features.{found.group(1)}.conv.{j + 1}"


TIMM_BLOCK_LAYERS = {2: (("conv_dw", "bn1"), ("conv_pw", "bn2")),  # depthwise separable (no expansion)
                     3: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))}


def timm_layer_names(prefix, block_length):
    """(conv weight, BN prefix) of timm's name for our Conv+BN layer `prefix`."""
    if prefix == "features.0":
        return "conv_stem.weight", "bn1"
    found = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)", prefix)
    if found is None:
        return "conv_head.weight", "bn2"
    stage, index = _block_stage_index(int(found.group(1)))
    conv, bn = TIMM_BLOCK_LAYERS[block_length][int(found.group(2))]
    return f"blocks.{stage}.{index}.{conv}.weight", f"blocks.{stage}.{index}.{bn}"


class Layout(NamedTuple):
    marker: str            # a name only this layout has
    last_projection: str   # the last stage's projection weight: its channels give the width
    layer_names: Callable  # (our Conv+BN layer's prefix, layers in its block) -> (conv weight, BN prefix)
    classifier: str        # prefix of the classifier's weight and bias


LAYOUTS = {
    "torchvision": Layout("features.0.0.weight", "features.17.conv.2.weight", torchvision_layer_names,
                          "classifier.1"),
    "timm": Layout("conv_stem.weight", "blocks.6.0.conv_pwl.weight", timm_layer_names, "classifier"),
}


def detect_layout(state, path):
    for name, layout in LAYOUTS.items():
        if layout.marker in state:
            return name
    shown = ", ".join(list(state)[:5])
    raise WeightImportError(f"{path} is not a MobileNetV2 state dict of torchvision or timm: none of "
                            f"{', '.join(layout.marker for layout in LAYOUTS.values())} in it (its first names: "
                            f"{shown})")


def name_map(network, layout):
    """our Parameter name -> theirs, for every Parameter of `network` (a float MobileNetV2)."""
    layer_names, classifier = LAYOUTS[layout].layer_names, LAYOUTS[layout].classifier
    cells = dict(network.cells_and_names())
    names = {}
    for prefix, cell in cells.items():
        if not isinstance(cell, ConvBNAct):
            continue
        block = re.fullmatch(r"(features\.\d+\.conv)\.\d+", prefix)
        block_length = len(cells[block.group(1)]) if block else 0
        conv, bn = layer_names(prefix, block_length)
        names[f"{prefix}.weight"] = conv
        names.update({f"{prefix}.{ours}": f"{bn}.{theirs}" for ours, theirs in BN_NAMES.items()})
    names.update({"classifier.weight": f"{classifier}.weight", "classifier.bias": f"{classifier}.bias"})
    return names


def convert(state, path="weights"):
    """(network, layout): the float MobileNetV2 holding `state` (name -> array, torchvision's or timm's names),
    built at the width and number of classes its shapes say. Anything that does not fit (a missing or unknown
    name, a shape) raises WeightImportError naming it; then nothing is built."""
    layout = detect_layout(state, path)
    last_projection, classifier = LAYOUTS[layout].last_projection, LAYOUTS[layout].classifier
    for needed in (last_projection, f"{classifier}.weight"):
        if needed not in state:
            raise WeightImportError(f"{path}: no {needed}: not a MobileNetV2 of {layout}'s layout with "
                                    f"{NUM_BLOCKS} inverted residual blocks")
    # The last stage has 320 * width channels, exactly for widths in steps of 0.025 (a multiple of 8 channels).
    width = state[last_projection].shape[0] / LAST_STAGE_CHANNELS
    num_classes = state[f"{classifier}.weight"].shape[0]
    network = mobilenet_v2(num_classes, width)
    names = name_map(network, layout)
    ours = network.parameters_dict()
    used = set(names.values())
    missing = [theirs for theirs in names.values() if theirs not in state]
    unexpected = [name for name in state if name not in used and not name.endswith(IGNORED_SUFFIXES)]
    wrong_shape = [f"{theirs} {state[theirs].shape} vs {tuple(ours[mine].shape)} ({mine})"
                   for mine, theirs in names.items() if theirs in state and state[theirs].shape != ours[mine].shape]
    problems = checkpoint.mismatch_lines(missing, unexpected, wrong_shape)
    if problems:
        raise WeightImportError(f"{path} does not fit the MobileNetV2 this suite builds ({layout} layout, width "
                                f"{width:g}, {num_classes} classes; the standard {NUM_BLOCKS} blocks):\n  "
                                + "\n  ".join(problems))
    for mine, theirs in names.items():
        ours[mine].set_data(ms.Tensor(state[theirs]))
    return network, layout


def import_weights(input_path, output_path, log=print):
    """Write the float checkpoint of public weights `input_path` to `output_path` (atomically; never over an
    existing file). Returns the network."""
    if not output_path.endswith(".ckpt"):
        raise WeightImportError(f"--output {output_path}: a checkpoint name must end in .ckpt")
    if os.path.exists(output_path):
        raise WeightImportError(f"{output_path} exists; remove it or choose another --output")
    network, layout = convert(read_state_dict(input_path), input_path)
    record = {"image_height": IMAGE_SIZE, "image_width": IMAGE_SIZE, "input_mean": MEAN, "input_std": STD}
    checkpoint.save(network, output_path, network, epoch_num=0, step_num=0, record=record)
    log(f"{input_path}: {layout} MobileNetV2, width {network.width_mult:g}, {network.num_classes} classes, "
        f"BN eps {BN_EPS:g}; expects {IMAGE_SIZE}x{IMAGE_SIZE} RGB input normalised with ImageNet's mean and std")
    return network
