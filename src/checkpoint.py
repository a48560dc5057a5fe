"""Checkpoints: written atomically, read strictly.

A checkpoint holds the network's Parameters, optionally the training state (optimizer, loss scale), and a few
metadata entries that say what network it is and where training stood. Loading never half-loads: every name
the network needs must be there with the right shape, or the load fails naming what is wrong.
"""
import json
import os

import mindspore as ms
import numpy as np
from easydict import EasyDict

from src.dataset import check_input_record
from src.mobilenetV2 import network_from_config
from src.quant.layers import quant_state_names
from src.quant.quantizer import QuantConfig


# What a checkpoint says about its network (eval.py and export.py build it from these) and where training stood;
# the quantization's (QuantConfig.RECORDED) only in quantized checkpoints.
NETWORK_KEYS = ("num_classes", "width_mult", "depth_mult") + QuantConfig.RECORDED
# What it says about the input it was trained on (src.dataset.input_record): size and normalisation.
INPUT_KEYS = ("image_height", "image_width", "input_mean", "input_std")
META_KEYS = ("network_kind",) + NETWORK_KEYS + INPUT_KEYS + ("epoch_num", "step_num", "val_acc")
FLOAT, QUANT = "float", "quant"
# Names the training cell adds beside the network's own Parameters (optimizer and loss-scale state; the dynamic
# loss scale's step counters are top-level names).
TRAIN_STATE_PREFIXES = ("moments.", "learning_rate", "global_step", "momentum", "scale_sense", "loss_scaling_manager.",
                        "current_iterator_step", "last_overflow_iterator_step")
CLASSIFIER_PREFIX = "classifier."


class CheckpointError(ValueError):
    pass


def network_kind(network):
    return QUANT if getattr(network, "quantized", False) else FLOAT


def save(cell, path, network, epoch_num, step_num, record=None):
    """Save `cell` (a network or the whole training cell) to `path` via a temporary file, so a run killed
    mid-write never leaves a truncated checkpoint under the final name. `record`: more metadata to keep with it,
    e.g. the input the network was trained on (src.dataset.input_record) and its validation accuracy (val_acc)."""
    meta = {"network_kind": network_kind(network), "num_classes": network.num_classes,
            "width_mult": float(network.width_mult), "depth_mult": float(network.depth_mult),
            "epoch_num": int(epoch_num), "step_num": int(step_num)}
    if network.quant_config is not None:
        meta.update(network.quant_config.record())
    for key, value in (record or {}).items():
        meta[key] = ms.Tensor(np.array(value, np.float32)) if isinstance(value, (list, tuple)) else value
    tmp = path[:-len(".ckpt")] + ".tmp.ckpt" if path.endswith(".ckpt") else path + ".tmp.ckpt"
    ms.save_checkpoint(cell, tmp, append_dict=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path, only=None):
    """(parameters, metadata) of a checkpoint file, with a clear error for a missing or unreadable one.
    only: read just these parameter names (and the metadata); a quick look at a large checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        wanted = None if only is None else lambda name: name in META_KEYS or name in only
        entries = ms.load_checkpoint(path, choice_func=wanted)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    meta = {}
    for key in META_KEYS:
        if key in entries:
            value = entries.pop(key)
            if not isinstance(value, str):
                value = value.asnumpy()
                value = value.item() if value.ndim == 0 else value.tolist()
            meta[key] = json.loads(value) if key == "layer_weight_bits" else value
    if "act_bits" in meta and "edge_act_bits" not in meta:
        # Written before edge_act_bits was recorded, when every activation took act_bits.
        meta["edge_act_bits"] = meta["act_bits"]
    if "num_classes" in meta and "depth_mult" not in meta:
        meta["depth_mult"] = 1.0  # written before depth_mult was recorded: every network had MobileNetV2's depth
    if "network_kind" not in meta and only is None:
        # A checkpoint from elsewhere: the observers' state tells a quantized network from a float one.
        meta["network_kind"] = QUANT if any(".observer." in name for name in entries) else FLOAT
    return entries, meta


def mismatch_lines(missing, unexpected, wrong_shape):
    """One line per kind of mismatch between a checkpoint and a network (names, or name-and-shape texts), with
    its count and the first ten: what a strict load reports."""
    lines = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            lines.append(f"{label} ({len(names)}): {shown}")
    return lines


def load_into(network, path, *, allow_missing=(), reinit_classifier=False, train_state=None, log=print):
    """Load checkpoint `path` into `network` (and `train_state`, a training cell, if given) by name.

    allow_missing: names of `network` the checkpoint may lack (they keep their initial values), e.g. the
    quantizers' state when a float checkpoint starts QAT. reinit_classifier: the classifier is not loaded, whatever
    its shape (another task's classes), but left initialised, and `log` says so. Returns the checkpoint's
    metadata.
    """
    entries, meta = read(path)
    target = (train_state or network).parameters_dict()
    own = network.parameters_dict()
    missing = [name for name in own if name not in entries and name not in allow_missing]
    unexpected = [name for name in entries if name not in target and not name.startswith(TRAIN_STATE_PREFIXES)]
    wrong_shape = [f"{name} {tuple(entries[name].shape)} vs {tuple(target[name].shape)}"
                   for name in entries if name in target and tuple(entries[name].shape) != tuple(target[name].shape)]
    if reinit_classifier:
        dropped = [s for s in wrong_shape if s.startswith(CLASSIFIER_PREFIX)]
        log("re-initialising the classifier" + (f" (checkpoint shape differs: {', '.join(dropped)})" if dropped
                                               else ", not loading the checkpoint's"))
        entries = {k: v for k, v in entries.items() if not k.startswith(CLASSIFIER_PREFIX)}
        missing = [m for m in missing if not m.startswith(CLASSIFIER_PREFIX)]
        wrong_shape = [s for s in wrong_shape if not s.startswith(CLASSIFIER_PREFIX)]
    if train_state is not None:
        missing += [name for name in target if name not in own and name not in entries]
    problems = mismatch_lines(missing, unexpected, wrong_shape)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the {network_kind(network)} network "
                              f"(checkpoint holds a {meta['network_kind']} network):\n  " + "\n  ".join(problems))
    loadable = {name: value for name, value in entries.items() if name in target}
    # What may be missing keeps its current value (and MindSpore does not warn about it, name by name).
    loadable.update({name: target[name] for name in target if name not in loadable})
    not_loaded, _ = ms.load_param_into_net(train_state or network, loadable, strict_load=True)
    if not_loaded and any(name in loadable for name in not_loaded):
        raise CheckpointError(f"checkpoint {path}: parameters not loaded: {not_loaded}")
    return meta


def load_network(path, config, expected_kind=None, given=frozenset(), quantized=None):
    """(network, config) of the network a checkpoint holds, with its weights: config (left as it is) with the
    checkpoint's classes, width, depth, (for a quantized one) bit widths, and the input size it was trained at
    unless `given` (config keys the user set) names it. quantized=True builds the quantized network from a float
    checkpoint too (its ranges then untracked: calibrate them)."""
    _, meta = read(path)
    config = EasyDict(config)
    check_input_record(config, meta, path, given)
    kind = meta["network_kind"]
    if expected_kind and kind != expected_kind:
        raise CheckpointError(f"--network {expected_kind} given, but {path} holds a {kind} network")
    for key in NETWORK_KEYS:
        if key in meta:
            config[key] = type(config[key])(meta[key])
    network = network_from_config(config, quantized=quantized or kind == QUANT)
    load_into(network, path, allow_missing=quant_state_names(network) if kind == FLOAT else ())
    return network, config
