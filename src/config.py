"""Configurations, one per device target, with the original suite's keys plus the quantization schedule.

Every key can be overridden on the command line as `--key value`; `parse_args` rejects unknown keys and values
of the wrong type, naming them, and prints the effective configuration.
"""
import argparse
import copy
import sys

from easydict import EasyDict as ed

from src.quant.fake_quant import MAX_BITS, MIN_BITS
from src.quant.quantizer import QUANTIZERS, QuantConfig

_COMMON = dict(
    num_classes=1000,
    width_mult=1.0,
    depth_mult=1.0,           # blocks per stage: ceil(repeats * depth_mult), at least one
    image_height=224,
    image_width=224,
    batch_size=32,
    epoch_size=60,            # epochs of this run
    start_epoch=200,          # epochs of the longer lr schedule already done (the float training): QAT takes its tail
    warmup_epochs=0,
    lr=0.3,                   # peak lr of the whole (start_epoch + epoch_size) schedule, not of this run
    lr_end=0.0,
    momentum=0.9,
    weight_decay=4e-5,        # on conv and dense weights, not on BN parameters and biases
    loss_scale=1024.0,
    loss_scale_type="fixed",  # "fixed" or "dynamic"
    label_smooth=0.1,
    save_checkpoint=True,
    save_checkpoint_epochs=1,
    save_checkpoint_steps=0,  # also every N global steps, mid-epoch included (0: at epoch ends only)
    keep_checkpoint_max=300,
    save_checkpoint_path="./checkpoint",
    # Quantization (QAT mode only). Steps are counted in epochs of this run.
    # 7-bit weights (int8 values in [-63, 63]): ONNX Runtime's fast uint8 x int8 kernels on x86 without VNNI
    # sum pairs of products in int16, which saturates with 8-bit weights; with 7 bits it cannot.
    weight_bits=7,
    act_bits=8,
    # Bits of the network's input, the classifier's input and the logits, at any act_bits: 8, as low-bit results
    # are reported (LSQ, AdaRound, BRECQ keep the first and last layers at 8 bits).
    edge_act_bits=8,
    ema_decay=0.999,
    # "minmax": scales from the observed ranges; "lsq": learned step sizes (LSQ), started from the ranges observed
    # until freeze_observer_epochs (give it 1 or more: an epoch of ranges to start from).
    quantizer="minmax",
    # {layer name: weight bits} for layers whose weights take other bits than weight_bits: a mixed-precision plan,
    # set by train.py --bits_plan FILE (not an option of its own) and recorded in checkpoints.
    layer_weight_bits={},
    quant_delay_epochs=0,     # observers watch, nothing is rounded
    freeze_bn_epochs=50,      # from here BN uses its running statistics: training sees the folded inference model
    freeze_observer_epochs=55,
    # Training batches (of the epoch BN freezes in) over which BN statistics are re-estimated just before BN
    # freezes, with the weights as they then are (0: no re-estimation; the running averages are kept).
    bn_reestimation_batches=0,
    # QAT: weight of the oscillation-dampening penalty in the loss, the squared distances of the latent weights to
    # the grid points they round to (0: none).
    oscillation_dampening=0.0,
    calibration_batches=32,   # --mode ptq: training batches the observers see (post-training quantization)
    # Data
    crop_min_scale=0.08,      # RandomResizedCrop scale range (crop_min_scale, 1.0)
    eval_resize_ratio=0.875,  # eval resizes the short side to image_size / ratio (224 / 0.875 = 256), then centre-crops
    num_parallel_workers=8,
    skip_bad_images=False,
    seed=1,
    log_interval=1,           # steps between per-step log lines
    eval_interval=1,          # with train.py --eval_dataset_path: validate every N epochs (and after the last)
    # "float16": convolutions and the dense layer compute in FP16 (FP32 master weights; BN, fake quantization
    # and observers stay FP32), with the loss scale keeping small gradients from underflowing.
    compute_dtype="float32",
)

config_ascend = ed(dict(_COMMON, batch_size=192, compute_dtype="float16"))
config_gpu = ed(dict(_COMMON, batch_size=134, compute_dtype="float16"))
config_cpu = ed(dict(_COMMON, batch_size=32, num_parallel_workers=2))

CONFIGS = {"Ascend": config_ascend, "GPU": config_gpu, "CPU": config_cpu}


def parse_bool(text):
    """An argparse type for yes/no options: 1/true/yes and 0/false/no (any case); anything else is an error."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ValueError(text)


parse_bool.__name__ = "bool"  # argparse names the type in its error: "invalid bool value"


def _typed(default):
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, float):
        return float
    return type(default)


def parse_args(description, add_script_args, argv=None):
    """Parse a script's own arguments plus `--key value` overrides of the config for `--device_target`.

    Returns (args, config); args.config_given names the config keys the command line set. Unknown options and
    badly typed values stop the script with a message naming them.
    """
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--device_target", default="CPU", choices=sorted(CONFIGS))
    known, _ = first.parse_known_args(argv)
    defaults = CONFIGS[known.device_target]

    parser = argparse.ArgumentParser(description=description, parents=[first], allow_abbrev=False)
    add_script_args(parser)
    overrides = parser.add_argument_group("config overrides (defaults for the chosen --device_target)")
    for key, default in defaults.items():
        if isinstance(default, dict):
            continue  # structured values come from files (train.py --bits_plan), not from --key value
        overrides.add_argument(f"--{key}", type=_typed(default), default=default, metavar=type(default).__name__.upper())
    args = parser.parse_args(argv)
    # The config keys set on the command line, as opposed to defaults: a checkpoint's record may fill the others.
    given = {token.split("=", 1)[0][2:] for token in (sys.argv[1:] if argv is None else argv)
             if token.startswith("--")}
    args.config_given = given & set(defaults)
    config = ed({key: getattr(args, key) if hasattr(args, key) else copy.deepcopy(default)
                 for key, default in defaults.items()})
    for key in defaults:
        if hasattr(args, key):
            delattr(args, key)
    error = validate(config)
    if error:
        parser.error(error)
    return args, config


def validate(config):
    """The first problem with the config's values, or None."""
    if config.compute_dtype not in ("float32", "float16"):
        return f"--compute_dtype must be 'float32' or 'float16', got {config.compute_dtype!r}"
    if config.quantizer not in QUANTIZERS:
        return f"--quantizer must be one of {', '.join(QUANTIZERS)}, got {config.quantizer!r}"
    if config.loss_scale_type not in ("fixed", "dynamic"):
        return f"--loss_scale_type must be 'fixed' or 'dynamic', got {config.loss_scale_type!r}"
    for key in QuantConfig.BIT_WIDTHS:
        if not MIN_BITS <= config[key] <= MAX_BITS:
            return f"--{key} must be between {MIN_BITS} and {MAX_BITS}, got {config[key]}"
    for key in ("num_classes", "batch_size", "image_height", "image_width", "save_checkpoint_epochs",
                "keep_checkpoint_max", "log_interval", "num_parallel_workers", "calibration_batches",
                "eval_interval"):
        if config[key] < 1:
            return f"--{key} must be at least 1, got {config[key]}"
    for key in ("epoch_size", "start_epoch", "warmup_epochs", "save_checkpoint_steps", "quant_delay_epochs",
                "bn_reestimation_batches", "freeze_bn_epochs", "freeze_observer_epochs", "oscillation_dampening"):
        if config[key] < 0:
            return f"--{key} must not be negative, got {config[key]}"
    for key in ("width_mult", "depth_mult"):
        if not config[key] > 0:
            return f"--{key} must be positive, got {config[key]}"
    if not 0.0 < config.crop_min_scale <= 1.0:
        return f"--crop_min_scale must be in (0, 1], got {config.crop_min_scale}"
    if not 0.0 <= config.ema_decay < 1.0:
        return f"--ema_decay must be in [0, 1), got {config.ema_decay}"
    return None


def print_config(config):
    print("effective config:")
    for key, value in config.items():
        print(f"  {key}: {value}")
