"""The deployed model's integer arithmetic, computed as ONNX Runtime's CPU kernels (MLAS, x86) compute the
exported graph: inference of a quantized network runs it, so evaluating a quantized checkpoint gives, image for
image, the logits of the INT8 ONNX model.

Activations travel as (codes, scale, zero_point): uint8 codes held exactly in float32, and their quantization.
Per operator of the exported graph, as ONNX Runtime runs it after its QDQ fusion:
- QuantizeLinear: saturate(round(x / scale) + zero_point).
- QLinearConv: acc = sum((x - x_zero_point) * w) + bias, exact in int32; y = saturate(round(float32(acc) * m)
  + y_zero_point) with m = x_scale * w_scale / y_scale in float32, per output channel. (MLAS clamps before it
  rounds; the bounds are integers, so that is the same.) The ReLU6 Clip is folded away: the uint8 range lies
  within [0, 6].
- QLinearAdd: MLAS's AVX2 kernel (AVX-512 CPUs run it too): ratios ra = a_scale / c_scale, rb = b_scale / c_scale,
  a constant k = c_zero_point - fma(ra, a_zero_point, rb * b_zero_point), then c = saturate(round(fma(a, ra,
  fma(b, rb, k)))), each fma rounded once. The constant's fma is the compiler's contraction of ORT's
  `ra * za + rb * zb`: measured against ONNX Runtime (tests/test_integer.py), the unfused sum differs.
- QLinearGlobalAveragePool: acc = sum(codes) - x_zero_point * HW; y = saturate(round(float32(acc) * (x_scale /
  (y_scale * HW))) + y_zero_point).
- DequantizeLinear: (codes - zero_point) * scale.
Rounding is half to even throughout (ops.round, as the CPU's conversion instruction).
"""
import mindspore as ms
from mindspore import ops

# Integers a float32 holds exactly, and so every sum of them below it, in any order.
FLOAT32_EXACT_INTEGERS = 2 ** 24
ACTIVATION_CODES = 255  # uint8; centred codes (x - zero_point) lie within [-255, 255]
WEIGHT_DIGIT = 16


def saturate(values):
    """To uint8 codes: the deployed kernels store every activation as uint8, whatever act_bits trained."""
    return ops.clip_by_value(values, 0.0, float(ACTIVATION_CODES))


def quantize(x, scale, zero_point):
    return saturate(ops.round(x / scale) + zero_point), scale, zero_point


def dequantize(x):
    codes, scale, zero_point = x
    return (codes - zero_point) * scale


def requantize(product, bias, multiplier, zero_point):
    """A product (N, C, ...) of accumulate plus the int32 bias [C], to uint8 codes: float32(acc) * multiplier [C],
    rounded, shifted by the zero point. (The Requantize CPU kernel computes the same in one pass.)"""
    shape = (1, -1) + (1,) * (product.ndim - 2)
    acc = product.astype(ms.int32) + bias.reshape(shape)
    return saturate(ops.round(acc.astype(ms.float32) * multiplier.reshape(shape)) + zero_point)


def needs_weight_digits(fan_in, weight_qmax):
    """Whether a product of `fan_in` centred activation codes with weights of magnitude up to `weight_qmax` can
    leave float32's exact integers (e.g. 1x1 convolutions of 960 channels with 8-bit weights, the classifier)."""
    return fan_in * ACTIVATION_CODES * weight_qmax >= FLOAT32_EXACT_INTEGERS


def accumulate(product, x, weight_codes, digits):
    """product(x, weight_codes) (a convolution or a matrix product, bias-free and linear in the weights) of
    integer-valued float32 tensors, exact: float32 holding integers; with `digits`, int32: the weights are split
    into base-16 digits (|digit| <= 8), each product exact in float32, and recombined in int32."""
    if not digits:
        return product(x, weight_codes)
    high = ops.round(weight_codes / WEIGHT_DIGIT)
    low = weight_codes - WEIGHT_DIGIT * high
    return product(x, high).astype(ms.int32) * WEIGHT_DIGIT + product(x, low).astype(ms.int32)


def bias_codes(bias, bias_scale):
    """The int32 bias of an integer convolution: at scale x_scale * w_scale, as the exported model stores it."""
    return ops.round(bias / bias_scale).astype(ms.int32)


def _fma(a, b, c):
    """a * b + c rounded once to float32, as an FMA instruction: in float64, where the product of a uint8 code (or a
    zero point) with a float32 is exact and so is the sum at these magnitudes."""
    return (a.astype(ms.float64) * b.astype(ms.float64) + c.astype(ms.float64)).astype(ms.float32)


def add_constants(a, b, scale, zero_point):
    """[ratio_a, ratio_b, constant] of QLinearAdd of quantized activations a and b into (scale, zero_point)."""
    (_, scale_a, zero_a), (_, scale_b, zero_b) = a, b
    ratio_a, ratio_b = scale_a / scale, scale_b / scale
    return ops.stack([ratio_a, ratio_b, zero_point - _fma(ratio_a, zero_a, ratio_b * zero_b)])


def add(codes_a, codes_b, constants):
    """QLinearAdd's codes from add_constants. (The QLinearAdd CPU kernel computes the same in one pass.)"""
    return saturate(ops.round(_fma(codes_a, constants[0], _fma(codes_b, constants[1], constants[2]))))


def global_average_pool(x, scale, zero_point):
    """QLinearGlobalAveragePool of x (N, C, H, W) into the range (scale, zero_point): (N, C) codes."""
    codes, x_scale, x_zero_point = x
    size = codes.shape[2] * codes.shape[3]
    # A channel's sum of uint8 codes is exact in float32 up to 65,000 values (a 8,000 x 8,000 input), so acc is
    # float32(int32 acc) already.
    acc = ops.sum(codes, (2, 3)) - x_zero_point * size
    return saturate(ops.round(acc * (x_scale / (scale * size))) + zero_point), scale, zero_point
