// Per-tensor fake quantization and range observation (float32) for MindSpore CPU custom "aot" operators, each
// one pass over the tensor where the same arithmetic written as MindSpore ops takes six (forward) or nine
// (gradient) and a reduction each for min and max: they took most of a QAT step's time on CPU (measured).
// The arithmetic is that of src/quant/fake_quant.py, in the same order, so both give identical bits:
//   q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax), y = (q - zero_point) * scale.
//
//   FakeQuantPerTensor     (x, scale[1], zero_point[1], settings[3] = {qmin, qmax, enabled})  -> y
//   FakeQuantPerTensorGrad (dy, x, scale[1], zero_point[1], settings[3])                      -> dx: dy where the
//                          rounded value lies inside [qmin, qmax] (straight through), 0 where it was clamped
// With enabled = 0 (the quantization delay) y = x and dx = dy: the switch is an input, not a branch of the
// graph, because tensor-valued branches made the QAT training graph compile several times slower (measured).
//   MinMax                 (x)                                                          -> [min(x), max(x)]
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

// Checks that params[x] and params[out] have the same element count, scale and zero point one each, settings 3.
bool per_tensor(int *ndims, int64_t **shapes, int x, int scale, int out) {
  const int64_t count = element_count(ndims[x], shapes[x]);
  return element_count(ndims[out], shapes[out]) == count && element_count(ndims[scale], shapes[scale]) == 1 &&
         element_count(ndims[scale + 1], shapes[scale + 1]) == 1 &&
         element_count(ndims[scale + 2], shapes[scale + 2]) == 3;
}

struct QParams {
  float scale, zero_point, qmin, qmax;
  bool enabled;
};

// The inputs scale, zero_point and settings = {qmin, qmax, enabled}, starting at params[first].
QParams read_qparams(void **params, int first) {
  const float *settings = static_cast<const float *>(params[first + 2]);
  return QParams{*static_cast<const float *>(params[first]), *static_cast<const float *>(params[first + 1]),
                 settings[0], settings[1], settings[2] > 0.5f};
}

}  // namespace

extern "C" int FakeQuantPerTensor(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  if (nparam != 5 || !float32_inputs(nparam, dtypes) || !per_tensor(ndims, shapes, 0, 1, 4)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const QParams qp = read_qparams(params, 1);
  const float scale = qp.scale, zero_point = qp.zero_point, qmin = qp.qmin, qmax = qp.qmax;
  float *y = static_cast<float *>(params[4]);
  const int64_t count = element_count(ndims[0], shapes[0]);
  if (!qp.enabled) {
    std::memcpy(y, x, sizeof(float) * count);
    return 0;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const float rounded = std::rint(x[i] / scale) + zero_point;
    const float q = rounded < qmin ? qmin : (rounded > qmax ? qmax : rounded);
    y[i] = (q - zero_point) * scale;
  }
  return 0;
}

extern "C" int FakeQuantPerTensorGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  if (nparam != 6 || !float32_inputs(nparam, dtypes) || !per_tensor(ndims, shapes, 1, 2, 5) ||
      element_count(ndims[0], shapes[0]) != element_count(ndims[1], shapes[1])) {
    return 1;
  }
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const QParams qp = read_qparams(params, 2);
  const float scale = qp.scale, zero_point = qp.zero_point, qmin = qp.qmin, qmax = qp.qmax;
  float *dx = static_cast<float *>(params[5]);
  const int64_t count = element_count(ndims[0], shapes[0]);
  if (!qp.enabled) {
    std::memcpy(dx, dy, sizeof(float) * count);
    return 0;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const float q = std::rint(x[i] / scale) + zero_point;
    dx[i] = (q >= qmin && q <= qmax) ? dy[i] : 0.0f;
  }
  return 0;
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
