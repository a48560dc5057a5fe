"""CPU kernels of our own, run as MindSpore custom "aot" operators with their own gradients, where MindSpore's
CPU kernels were the bottleneck of a training step (measured; see README, Performance):

- direct_conv.cc: convolutions larger than 1x1. MindSpore's CPU Conv2D gives oneDNN plain NCHW tensors, and
  oneDNN then runs depthwise and other non-1x1 convolutions with its reference implementation: 90% of a float
  MobileNetV2 training step. 1x1 convolutions take oneDNN's fast path and stay as they are.
- fake_quant.cc: fake quantization (per tensor or per output channel) and min/max observation in one pass each,
  the moving-average observer's update in one operator instead of about forty, and the output of a
  quantized Conv+BN(+ReLU6) layer: per-channel statistics of the convolution's output in one pass, then BN's
  affine, the activation and the fake quantization in another (written out as ops, each a pass of its own and a
  tensor kept for backward); and integer inference's requantization and residual add, one pass each (as ops,
  about eight: integer evaluation ran at a quarter of fake quantization's speed, measured).

On GPU and Ascend, and on CPU without a C++ compiler (a warning says so), the same computations run as
MindSpore ops. The C++ sources are compiled with the machine's g++ on first use into a per-user cache.
"""
import hashlib
import os
import subprocess
import tempfile
import warnings

import mindspore as ms
import numpy as np
from mindspore import nn, ops, Tensor

SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("direct_conv.cc",
                                                                                     "fake_quant.cc")]
COMPILE = ["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_library_path = None  # compiled once per process: path, or "" when compiling failed


def compiler_target(march="native"):
    """What the compiler (g++) targets with -march=`march`: its predefined macros, which name every instruction-set
    extension it may use (__AVX2__, __AVX512F__, __AVX512VNNI__, ...) and its own version. Two machines that give
    the same text can share a compiled library; /proc/cpuinfo's model name cannot tell them apart (virtual
    machines report "AMD EPYC" with and without AVX-512)."""
    return subprocess.run([COMPILE[0], f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull], check=True,
                          capture_output=True, text=True).stdout


def library_path(target):
    """The cached library's path for a compiler target (see compiler_target): keyed by the compile command, the
    target and the sources, so a library is never loaded on a CPU it was not built for."""
    key = hashlib.sha256(" ".join(COMPILE).encode() + target.encode())
    for name in SOURCES:
        with open(name, "rb") as source:
            key.update(source.read())
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mobilenetv2_quant")
    return os.path.join(cache, f"cpu_kernels-{key.hexdigest()[:16]}.so")


def _compile(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Built under a temporary name and renamed: data-parallel workers may compile at the same time.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run(COMPILE + ["-o", partial] + SOURCES, check=True, capture_output=True, text=True)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def cpu_kernel_library():
    """Path of the compiled kernels when running on CPU, else None; None too if they cannot be compiled here
    (the reason is given as a warning)."""
    global _library_path
    if ms.get_context("device_target") != "CPU":
        return None
    if _library_path is None:
        try:
            path = library_path(compiler_target())
            if not os.path.exists(path):
                _compile(path)
        except (OSError, subprocess.CalledProcessError) as error:
            details = getattr(error, "stderr", "") or str(error)
            warnings.warn(f"could not compile the CPU kernels in {os.path.dirname(SOURCES[0])} "
                          f"({details.strip()}); using MindSpore's ops instead, several times slower for "
                          f"depthwise convolutions and fake quantization. Install g++ to fix this.")
            path = ""
        _library_path = path
    return _library_path or None


class UsesKernels:
    """A cell that computes some things with our CPU kernels where this machine has them and with MindSpore ops
    otherwise. Each such choice is made by `use_kernel`, the only place that asks for the library, and
    `use_mindspore_ops` undoes every one of them."""

    def use_kernel(self, name, make, fallback=None, available=True):
        """Set attribute `name` to make(library) when our kernels are compiled here (and `available`), else to
        `fallback`, the MindSpore-ops form (None: the cell computes it with ops in its construct)."""
        library = cpu_kernel_library() if available else None
        setattr(self, name, make(library) if library else fallback)
        self.kernel_fallbacks = dict(getattr(self, "kernel_fallbacks", {}), **{name: fallback})

    def use_mindspore_ops(self):
        for name, fallback in self.kernel_fallbacks.items():
            setattr(self, name, fallback)


def use_mindspore_ops(network):
    """Replaces our kernels by MindSpore ops in every cell of `network` (a cell or a network): an exported graph
    must not depend on this machine's compiled library. Takes effect in graphs compiled afterwards."""
    for _, cell in network.cells_and_names():
        if isinstance(cell, UsesKernels):
            cell.use_mindspore_ops()


def _shape_of(index):
    """Output shape function of a custom operator: the shape of its input `index`."""
    return lambda *shapes: list(shapes[index])


def _output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


class DirectConv2D(nn.Cell):
    """Grouped NCHW float32 convolution y = conv(x, weight) as a custom CPU operator, called like ops.Conv2D.
    Inputs of another float type are computed in float32 and the result cast back."""

    def __init__(self, library, stride, padding):
        super().__init__()
        self.geometry = Tensor(np.array([stride, padding], np.int32))

        def output_shape(x, weight, _):
            return [x[0], weight[0], _output_size(x[2], weight[2], stride, padding),
                    _output_size(x[3], weight[3], stride, padding)]

        input_grad = ops.Custom(f"{library}:DirectConvInputGrad", _shape_of(2), ms.float32, "aot")
        weight_grad = ops.Custom(f"{library}:DirectConvWeightGrad", _shape_of(2), ms.float32, "aot")

        def bprop(x, weight, geometry, out, dout):
            return input_grad(dout, weight, x, geometry), weight_grad(dout, x, weight, geometry), \
                ops.zeros_like(geometry)

        self.forward = ops.Custom(f"{library}:DirectConv", output_shape, ms.float32, "aot", bprop=bprop)
        # MindSpore reuses one instance's inferred output shape for another instance of the same custom operator
        # with the same input shapes (seen inside the quantized layer's branches once gradients flow): the
        # geometry as primitive attributes makes layers of different strides distinct operators.
        self.forward.add_prim_attr("stride", stride)
        self.forward.add_prim_attr("padding", padding)

    def construct(self, x, weight):
        return self.forward(x.astype(ms.float32), weight.astype(ms.float32), self.geometry).astype(x.dtype)


def stock_convolution(out_channels, kernel_size, stride, padding, groups):
    """MindSpore's Conv2D, which every backend and exported graph knows. Called as op(x, weight)."""
    # A tuple kernel size: an int one breaks MindSpore's ONNX export.
    return ops.Conv2D(out_channels, (kernel_size, kernel_size), pad_mode="pad", pad=padding, stride=stride,
                      group=groups)


def fake_quant_ops(library):
    """(forward, gradient) custom operators: forward(x, scale, zero_point, settings) -> y and
    gradient(dy, x, scale, zero_point, settings) -> dx, with scale and zero_point one value (per tensor) or one per
    index of x's first axis (per channel), settings float32 [qmin, qmax, enabled]; see fake_quant.cc."""
    return (ops.Custom(f"{library}:FakeQuant", _shape_of(0), ms.float32, "aot"),
            ops.Custom(f"{library}:FakeQuantGrad", _shape_of(1), ms.float32, "aot"))


def min_max_op(library):
    """Custom operator x -> float32 [min(x), max(x)] in one pass."""
    return ops.Custom(f"{library}:MinMax", lambda _: [2], ms.float32, "aot")


def observe_range_op(library):
    """Custom operator (batch[2], state[4], settings[3]) -> float32 [5]: the moving-average min/max observer's
    update and its new scale and zero point; see fake_quant.cc."""
    return ops.Custom(f"{library}:ObserveRange", lambda *_: [5], ms.float32, "aot")


def channel_stats_op(library):
    """Custom operator y (N, C, H, W) -> float32 [4, C]: each channel's mean, biased variance, min and max, in one
    pass. Its gradient flows from the mean and the variance; the min and max rows feed observers, which take none."""
    gradient = ops.Custom(f"{library}:ChannelStatsGrad", _shape_of(1), ms.float32, "aot")

    def bprop(y, out, dout):
        return (gradient(dout, y, out),)
    return ops.Custom(f"{library}:ChannelStats", lambda y: [4, y[1]], ms.float32, "aot", bprop=bprop)


def affine_act_fake_quant_op(library):
    """Custom operator (y, a, b, scale, zero_point, settings) -> fake_quant(act(a * y + b)) with a, b per channel of
    y (N, C, H, W), settings float32 [qmin, qmax, enabled, act_low, act_high]; see fake_quant.cc. Its gradient
    recomputes act(a * y + b) from y and gives y's, a's and b's."""
    gradient = ops.Custom(f"{library}:AffineActFakeQuantGrad",
                          lambda dout, y, a, b, *_: (list(y), list(a), list(b)), (ms.float32,) * 3, "aot")

    def bprop(y, a, b, scale, zero_point, settings, out, dout):
        dy, da, db = gradient(dout, y, a, b, scale, zero_point, settings)
        return dy, da, db, ops.zeros_like(scale), ops.zeros_like(zero_point), ops.zeros_like(settings)
    return ops.Custom(f"{library}:AffineActFakeQuant", _shape_of(0), ms.float32, "aot", bprop=bprop)


def requantize_op(library):
    """Custom operator (y, bias[C] int32, multiplier[C], [zero_point, lowest, highest]) -> uint8 codes (as float32)
    of y (N, C, ...) holding exact integers, clamped to [lowest, highest]; see fake_quant.cc. Inference only."""
    return ops.Custom(f"{library}:Requantize", _shape_of(0), ms.float32, "aot")


def qlinear_add_op(library):
    """Custom operator (a, b, constants[3]) -> uint8 codes (as float32) of the integer residual add; see
    fake_quant.cc. Inference only: no gradient."""
    return ops.Custom(f"{library}:QLinearAdd", _shape_of(0), ms.float32, "aot")


def activation_bounds(activation):
    """[low, high] of the AffineActFakeQuant kernel's activation clamp: ReLU6 (`activation`) or none."""
    return np.array([0.0, 6.0] if activation else [-np.inf, np.inf], np.float32)


class AffineAct(nn.Cell):
    """act(a * y + b) with a and b per channel of y (N, C, H, W), act ReLU6 (`activation`) or none: BN's affine and
    the activation of a float layer, as the AffineActFakeQuant kernel with rounding off (one pass, y kept for
    backward)."""

    def __init__(self, library, activation):
        super().__init__()
        self.op = affine_act_fake_quant_op(library)
        self.unit, self.zero = Tensor(np.ones(1, np.float32)), Tensor(np.zeros(1, np.float32))
        # qmin, qmax, rounding off, then the activation's bounds
        self.settings = Tensor(np.concatenate([np.zeros(3, np.float32), activation_bounds(activation)]))

    def construct(self, y, a, b):
        return self.op(y, a, b, self.unit, self.zero, self.settings)
