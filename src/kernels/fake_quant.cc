// Fake quantization, range observation and the BN-corrected output of a quantized Conv+BN(+ReLU6)
// layer (float32), as MindSpore CPU custom "aot" operators. Each is one pass over the tensor where the same
// arithmetic written as MindSpore ops takes several: they took most of a QAT step's time on CPU (measured).
// The arithmetic is that of src/quant/fake_quant.py, in the same order, so both give identical bits:
//   q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax), y = (q - zero_point) * scale.
//
//   FakeQuant              (x, scale[K], zero_point[K], settings[3] = {qmin, qmax, enabled})  -> y
//   FakeQuantGrad          (dy, x, scale[K], zero_point[K], settings[3])                      -> dx: dy where the
//                          rounded value lies inside [qmin, qmax] (straight through), 0 where it was clamped
// with K = 1 (per tensor: activations) or K = x's first dimension (per channel: weights, output channels first).
// With enabled = 0 (the quantization delay) y = x and dx = dy: the switch is an input, not a branch of the
// graph, because tensor-valued branches made the QAT training graph compile several times slower (measured).
//   MinMax                 (x)                                                          -> [min(x), max(x)]
//   ObserveRange           (batch[2] = {min, max}, state[4] = {min, max, batches_seen, enabled},
//                          settings[3] = {ema_decay, qmin, qmax}) -> [5]: the moving-average observer's new min,
//                          max and batches_seen, then the new range's scale and zero point (src/quant/observers.py:
//                          about forty small ops there; thousands of small graph nodes cost compile and step time)
//
// A quantized Conv+BN layer's output, from y = conv(x, folded quantized weights), NCHW:
//   ChannelStats           (y)                               -> [4, C]: mean, biased variance, min, max per channel
//   ChannelStatsGrad       (dstats[4, C], y, stats[4, C])    -> dy, from the mean and variance rows (the min and
//                          max rows only feed observers, which take no gradient)
//   AffineActFakeQuant     (y, a[C], b[C], scale[1], zero_point[1], settings[5])                -> fake_quant(act(a * y + b))
//   AffineActFakeQuantGrad (dout, y, a[C], b[C], scale[1], zero_point[1], settings[5])          -> (dy, da[C], db[C])
// with settings = {qmin, qmax, enabled, act_low, act_high}: act clamps to [act_low, act_high] (ReLU6: 0, 6; none:
// -inf, inf) and passes the gradient where act_low < v <= act_high, as MindSpore's ReLU6 does. a * y + b is
// rounded twice (a product, then a sum), never fused into one multiply-add, so that it is exactly what MindSpore's
// Mul and Add compute: the range of act(a * y + b) then follows from each channel's min and max (both operations
// are monotone), which is how the layer's observer sees its output without another pass over it.
// The backward passes recompute act(a * y + b) from y: only y is kept for them, not the tensors between.
//
// Integer inference (src/quant/integer.py), each one pass where MindSpore ops took several:
//   Requantize (y, bias[C] int32, multiplier[C], settings[3] = {zero_point, lowest, highest}) -> codes: y (N, C,
//              ...) a convolution's or matrix product's output holding exact integers (|y| < 2^24); codes =
//              clamp(rint(float(int32(y) + bias) * multiplier) + zero_point, lowest, highest): ONNX Runtime's
//              QLinearConv requantization (lowest, highest = 0, 255) and the code bounds' Clip after it, one pass.
//   QLinearAdd (a, b, constants[3] = {ratio_a, ratio_b, constant}) -> clamp(rint(fma(a, ratio_a, fma(b, ratio_b,
//              constant))), 0, 255), as MLAS's AVX2 QLinearAdd kernel (each fma rounded once: std::fma).

// No fused multiply-adds in this file (see above). Set before the includes: functions compiled with other options
// would not be inlined into these, and their loops would not vectorize.
#pragma GCC optimize("fp-contract=off")
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace {

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t count = 1;
  for (int d = 0; d < ndim; ++d) count *= shape[d];
  return count;
}

bool float32_inputs(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::string(dtypes[i]) != "float32") return false;
  }
  return true;
}

bool same_shape(int *ndims, int64_t **shapes, int a, int b) {
  if (ndims[a] != ndims[b]) return false;
  for (int d = 0; d < ndims[a]; ++d) {
    if (shapes[a][d] != shapes[b][d]) return false;
  }
  return true;
}

// Checks that params[x] and params[out] have the same element count, scale and zero point as many values as each
// other (one per tensor, or one per channel), and `settings` values after them.
bool fake_quant_shapes(int *ndims, int64_t **shapes, int x, int scale, int out, int64_t settings = 3) {
  const int64_t channels = element_count(ndims[scale], shapes[scale]);
  return element_count(ndims[out], shapes[out]) == element_count(ndims[x], shapes[x]) &&
         element_count(ndims[scale + 1], shapes[scale + 1]) == channels &&
         element_count(ndims[scale + 2], shapes[scale + 2]) == settings;
}

// fake_quant_shapes with one scale and one zero point.
bool per_tensor(int *ndims, int64_t **shapes, int x, int scale, int out, int64_t settings) {
  return element_count(ndims[scale], shapes[scale]) == 1 && fake_quant_shapes(ndims, shapes, x, scale, out, settings);
}

struct QParams {
  float scale, zero_point, qmin, qmax;
  bool enabled;
  float act_low, act_high;  // AffineActFakeQuant only
};

// The inputs scale, zero_point and settings = {qmin, qmax, enabled[, act_low, act_high]}, from params[first].
QParams read_qparams(void **params, int first, bool with_activation = false) {
  const float *settings = static_cast<const float *>(params[first + 2]);
  return QParams{*static_cast<const float *>(params[first]), *static_cast<const float *>(params[first + 1]),
                 settings[0], settings[1], settings[2] > 0.5f,
                 with_activation ? settings[3] : 0.0f, with_activation ? settings[4] : 0.0f};
}

inline float fake_quant(float x, const QParams &qp) {
  const float rounded = std::rint(x / qp.scale) + qp.zero_point;
  const float q = rounded < qp.qmin ? qp.qmin : (rounded > qp.qmax ? qp.qmax : rounded);
  return (q - qp.zero_point) * qp.scale;
}

// Values summed in float before a double total: short enough to lose no accuracy that matters, long enough that
// the double additions cost nothing.
constexpr int64_t kChunk = 256;

// The smallest scale (src/quant/observers.py's SCALE_EPS: float32's epsilon).
constexpr float kScaleEps = 1.1920928955078125e-07f;

// Written as comparisons: GCC does not vectorize these loops with std::fmin / std::fmax.
inline float clamp(float v, float low, float high) {
  const float above = v > low ? v : low;
  return above < high ? above : high;
}

// Whether the straight-through gradient passes x: its rounded value was not clamped.
inline bool in_range(float x, const QParams &qp) {
  const float q = std::rint(x / qp.scale) + qp.zero_point;
  return q >= qp.qmin && q <= qp.qmax;
}

// For a gradient: with rounding off nothing is clamped by it, which an unbounded range says without a branch in
// the loop (one ran 9x slower on random data, measured).
QParams gradient_range(QParams qp) {
  if (!qp.enabled) {
    qp.qmin = -INFINITY;
    qp.qmax = INFINITY;
  }
  return qp;
}

// NCHW: N, C and the plane size H * W of params[i].
struct Planes {
  int64_t n, c, plane;
};

bool nchw(int *ndims, int64_t **shapes, int i, Planes *p) {
  if (ndims[i] < 2) return false;
  p->n = shapes[i][0];
  p->c = shapes[i][1];
  p->plane = 1;
  for (int d = 2; d < ndims[i]; ++d) p->plane *= shapes[i][d];
  return p->n > 0 && p->plane > 0;
}

bool channel_vector(int *ndims, int64_t **shapes, int i, int64_t channels, int64_t rows = 1) {
  return element_count(ndims[i], shapes[i]) == rows * channels;
}

// Applies f(qparams, first, last, whole) to the index ranges of x (params[x]) that share a scale and zero point: the
// whole tensor (per tensor: f runs its loop in parallel), or each index of its first axis (per channel: the channels
// run in parallel).
template <typename F>
int for_each_range(int *ndims, int64_t **shapes, void **params, int x, int scale, F f) {
  const int64_t count = element_count(ndims[x], shapes[x]);
  const int64_t channels = element_count(ndims[scale], shapes[scale]);
  if (channels == 1) {
    f(read_qparams(params, scale), 0, count, true);
    return 0;
  }
  if (ndims[x] < 1 || shapes[x][0] != channels) return 1;
  const int64_t inner = count / channels;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < channels; ++c) {
    QParams qp = read_qparams(params, scale);
    qp.scale = static_cast<const float *>(params[scale])[c];
    qp.zero_point = static_cast<const float *>(params[scale + 1])[c];
    f(qp, c * inner, (c + 1) * inner, false);
  }
  return 0;
}

}  // namespace

extern "C" int FakeQuant(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  if (nparam != 5 || !float32_inputs(nparam, dtypes) || !fake_quant_shapes(ndims, shapes, 0, 1, 4)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[4]);
  return for_each_range(ndims, shapes, params, 0, 1, [=](const QParams &qp, int64_t first, int64_t last, bool whole) {
    if (!qp.enabled) {
      std::memcpy(y + first, x + first, sizeof(float) * (last - first));
      return;
    }
#pragma omp parallel for simd schedule(static) if (whole)
    for (int64_t i = first; i < last; ++i) y[i] = fake_quant(x[i], qp);
  });
}

extern "C" int FakeQuantGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 6 || !float32_inputs(nparam, dtypes) || !fake_quant_shapes(ndims, shapes, 1, 2, 5) ||
      element_count(ndims[0], shapes[0]) != element_count(ndims[1], shapes[1])) {
    return 1;
  }
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[5]);
  return for_each_range(ndims, shapes, params, 1, 2, [=](const QParams &qp, int64_t first, int64_t last, bool whole) {
    if (!qp.enabled) {
      std::memcpy(dx + first, dy + first, sizeof(float) * (last - first));
      return;
    }
#pragma omp parallel for simd schedule(static) if (whole)
    for (int64_t i = first; i < last; ++i) dx[i] = in_range(x[i], qp) ? dy[i] : 0.0f;
  });
}

extern "C" int MinMax(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  if (nparam != 2 || !float32_inputs(nparam, dtypes) || element_count(ndims[1], shapes[1]) != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  const int64_t count = element_count(ndims[0], shapes[0]);
  if (count == 0) return 1;
  float low = x[0], high = x[0];
#pragma omp parallel for simd reduction(min : low) reduction(max : high) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    low = std::fmin(low, x[i]);
    high = std::fmax(high, x[i]);
  }
  out[0] = low;
  out[1] = high;
  return 0;
}

extern "C" int ObserveRange(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 4 || !float32_inputs(nparam, dtypes) || element_count(ndims[0], shapes[0]) != 2 ||
      element_count(ndims[1], shapes[1]) != 4 || element_count(ndims[2], shapes[2]) != 3 ||
      element_count(ndims[3], shapes[3]) != 5) {
    return 1;
  }
  const float *batch = static_cast<const float *>(params[0]);
  const float *state = static_cast<const float *>(params[1]);
  const float *settings = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const float count = state[2], on = state[3], ema_decay = settings[0], qmin = settings[1], qmax = settings[2];
  // MovingAverageMinMaxObserver.observe_range: a plain mean of the first batches, then the moving average.
  const float ratio = count / (count + 1.0f);
  const float keep = ratio < ema_decay ? ratio : ema_decay;
  for (int i = 0; i < 2; ++i) {
    const float moved = keep * state[i] + (1.0f - keep) * batch[i];
    out[i] = on * moved + (1.0f - on) * state[i];
  }
  out[2] = count + on;
  // asymmetric_qparams: the range widened to hold 0, its scale, the zero point rounded half to even.
  const float low = out[0] < 0.0f ? out[0] : 0.0f, high = out[1] > 0.0f ? out[1] : 0.0f;
  const float width = (high - low) / (qmax - qmin);
  const float scale = width > kScaleEps ? width : kScaleEps;
  out[3] = scale;
  out[4] = clamp(std::rint(qmin - low / scale), qmin, qmax);
  return 0;
}

extern "C" int ChannelStats(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  Planes p;
  if (nparam != 2 || !float32_inputs(nparam, dtypes) || !nchw(ndims, shapes, 0, &p) ||
      !channel_vector(ndims, shapes, 1, p.c, 4)) {
    return 1;
  }
  const float *y = static_cast<const float *>(params[0]);
  float *stats = static_cast<float *>(params[1]);
  const int64_t batch = p.n, channels = p.c, plane = p.plane;
  const double count = static_cast<double>(batch * plane);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < channels; ++c) {
    // Sums of d = y - shift, with shift the mean of the channel's first plane (close to the channel's mean), so
    // that the variance E[d^2] - E[d]^2 does not cancel when the mean is far from 0; float sums over short
    // chunks (vectorized), the chunks added in double.
    double first_plane = 0.0;
    for (int64_t i = 0; i < plane; ++i) first_plane += y[c * plane + i];
    const float shift = static_cast<float>(first_plane / plane);
    double sum = 0.0, squares = 0.0;
    float low = y[c * plane], high = low;
    for (int64_t n = 0; n < batch; ++n) {
      const float *values = y + (n * channels + c) * plane;
      for (int64_t first = 0; first < plane; first += kChunk) {
        const int64_t last = first + kChunk < plane ? first + kChunk : plane;
        float chunk_sum = 0.0f, chunk_squares = 0.0f;
#pragma omp simd reduction(+ : chunk_sum, chunk_squares) reduction(min : low) reduction(max : high)
        for (int64_t i = first; i < last; ++i) {
          const float v = values[i], d = v - shift;
          chunk_sum += d;
          chunk_squares += d * d;
          low = v < low ? v : low;
          high = v > high ? v : high;
        }
        sum += chunk_sum;
        squares += chunk_squares;
      }
    }
    const double mean = sum / count, variance = squares / count - mean * mean;
    stats[c] = static_cast<float>(shift + mean);
    stats[channels + c] = static_cast<float>(variance > 0.0 ? variance : 0.0);
    stats[2 * channels + c] = low;
    stats[3 * channels + c] = high;
  }
  return 0;
}

extern "C" int ChannelStatsGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  Planes p;
  if (nparam != 4 || !float32_inputs(nparam, dtypes) || !nchw(ndims, shapes, 1, &p) ||
      !channel_vector(ndims, shapes, 0, p.c, 4) || !channel_vector(ndims, shapes, 2, p.c, 4) ||
      !same_shape(ndims, shapes, 1, 3)) {
    return 1;
  }
  const float *dstats = static_cast<const float *>(params[0]);
  const float *y = static_cast<const float *>(params[1]);
  const float *stats = static_cast<const float *>(params[2]);
  float *dy = static_cast<float *>(params[3]);
  const float count = static_cast<float>(p.n * p.plane);
  // d mean / dy = 1 / count; d variance / dy = 2 (y - mean) / count.
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < p.n * p.c; ++q) {
    const int64_t c = q % p.c;
    const float from_mean = dstats[c] / count, from_variance = 2.0f * dstats[p.c + c] / count, mean = stats[c];
    const float *in = y + q * p.plane;
    float *out = dy + q * p.plane;
#pragma omp simd
    for (int64_t i = 0; i < p.plane; ++i) out[i] = from_mean + from_variance * (in[i] - mean);
  }
  return 0;
}

extern "C" int AffineActFakeQuant(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  Planes p;
  if (nparam != 7 || !float32_inputs(nparam, dtypes) || !nchw(ndims, shapes, 0, &p) ||
      !channel_vector(ndims, shapes, 1, p.c) || !channel_vector(ndims, shapes, 2, p.c) ||
      !per_tensor(ndims, shapes, 0, 3, 6, 5)) {
    return 1;
  }
  const float *y = static_cast<const float *>(params[0]);
  const float *a = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const QParams qp = read_qparams(params, 3, true);
  float *out = static_cast<float *>(params[6]);
  const int64_t planes = p.n * p.c, channels = p.c, plane = p.plane;
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < planes; ++q) {
    // Everything the inner loops read, as locals: read through the region's shared structs it does not vectorize.
    const QParams local = qp;
    const float scale = a[q % channels], shift = b[q % channels], low = local.act_low, high = local.act_high;
    const float *in = y + q * plane;
    float *result = out + q * plane;
    if (local.enabled) {
#pragma omp simd
      for (int64_t i = 0; i < plane; ++i) result[i] = fake_quant(clamp(scale * in[i] + shift, low, high), local);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < plane; ++i) result[i] = clamp(scale * in[i] + shift, low, high);
    }
  }
  return 0;
}

extern "C" int AffineActFakeQuantGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  Planes p;
  if (nparam != 10 || !float32_inputs(nparam, dtypes) || !nchw(ndims, shapes, 1, &p) ||
      !same_shape(ndims, shapes, 0, 1) || !same_shape(ndims, shapes, 1, 7) ||
      !channel_vector(ndims, shapes, 2, p.c) || !channel_vector(ndims, shapes, 3, p.c) ||
      !per_tensor(ndims, shapes, 1, 4, 7, 5) || !channel_vector(ndims, shapes, 8, p.c) ||
      !channel_vector(ndims, shapes, 9, p.c)) {
    return 1;
  }
  const float *dout = static_cast<const float *>(params[0]);
  const float *y = static_cast<const float *>(params[1]);
  const float *a = static_cast<const float *>(params[2]);
  const float *b = static_cast<const float *>(params[3]);
  const QParams qp = read_qparams(params, 4, true);
  float *dy = static_cast<float *>(params[7]);
  float *da = static_cast<float *>(params[8]);
  float *db = static_cast<float *>(params[9]);
  const int64_t batch = p.n, channels = p.c, plane = p.plane;
  // Channels outermost: each thread owns its channels' sums (float over short chunks, the chunks added in double).
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < channels; ++c) {
    const QParams local = gradient_range(qp);
    const float scale = a[c], shift = b[c], low = local.act_low, high = local.act_high;
    double scale_sum = 0.0, shift_sum = 0.0;
    for (int64_t n = 0; n < batch; ++n) {
      const int64_t offset = (n * channels + c) * plane;
      const float *g = dout + offset, *in = y + offset;
      float *grad = dy + offset;
      for (int64_t first = 0; first < plane; first += kChunk) {
        const int64_t last = first + kChunk < plane ? first + kChunk : plane;
        float chunk_scale = 0.0f, chunk_shift = 0.0f;
#pragma omp simd reduction(+ : chunk_scale, chunk_shift)
        for (int64_t i = first; i < last; ++i) {
          const float v = scale * in[i] + shift;
          const bool passes = v > low && v <= high && in_range(clamp(v, low, high), local);
          const float pass = passes ? g[i] : 0.0f;
          grad[i] = pass * scale;
          chunk_scale += pass * in[i];
          chunk_shift += pass;
        }
        scale_sum += chunk_scale;
        shift_sum += chunk_shift;
      }
    }
    da[c] = static_cast<float>(scale_sum);
    db[c] = static_cast<float>(shift_sum);
  }
  return 0;
}

extern "C" int Requantize(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  Planes p;
  if (nparam != 5 || std::string(dtypes[0]) != "float32" || std::string(dtypes[1]) != "int32" ||
      std::string(dtypes[2]) != "float32" || std::string(dtypes[3]) != "float32" || !nchw(ndims, shapes, 0, &p) ||
      !channel_vector(ndims, shapes, 1, p.c) || !channel_vector(ndims, shapes, 2, p.c) ||
      !channel_vector(ndims, shapes, 3, 3)) {
    return 1;
  }
  const float *y = static_cast<const float *>(params[0]);
  const int32_t *bias = static_cast<const int32_t *>(params[1]);
  const float *multiplier = static_cast<const float *>(params[2]);
  const float *settings = static_cast<const float *>(params[3]);
  const float zero_point = settings[0], lowest = settings[1], highest = settings[2];
  float *out = static_cast<float *>(params[4]);
  const int64_t planes = p.n * p.c, channels = p.c, plane = p.plane;
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < planes; ++q) {
    const int32_t shift = bias[q % channels];
    const float scale = multiplier[q % channels], zero = zero_point, low = lowest, high = highest;
    const float *in = y + q * plane;
    float *codes = out + q * plane;
#pragma omp simd
    for (int64_t i = 0; i < plane; ++i) {
      const float v = std::rint(static_cast<float>(static_cast<int32_t>(in[i]) + shift) * scale) + zero;
      codes[i] = clamp(v, low, high);
    }
  }
  return 0;
}

extern "C" int QLinearAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  const int64_t count = element_count(ndims[0], shapes[0]);
  if (nparam != 4 || !float32_inputs(nparam, dtypes) || element_count(ndims[1], shapes[1]) != count ||
      element_count(ndims[2], shapes[2]) != 3) {
    return 1;
  }
  const float *a = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  const float *constants = static_cast<const float *>(params[2]);
  const float ratio_a = constants[0], ratio_b = constants[1], constant = constants[2];
  float *out = static_cast<float *>(params[3]);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    out[i] = clamp(std::rint(std::fma(a[i], ratio_a, std::fma(b[i], ratio_b, constant))), 0.0f, 255.0f);
  }
  return 0;
}
