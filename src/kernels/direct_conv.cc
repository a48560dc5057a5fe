// Direct grouped convolution (NCHW, float32) for MindSpore CPU custom "aot" operators: forward, gradient of the
// input and gradient of the weight.
//
// Why: MindSpore's CPU Conv2D hands oneDNN plain NCHW tensors, and for kernels larger than 1x1 (MobileNetV2's
// depthwise convolutions and its first convolution) oneDNN then falls back to its reference implementation,
// which took 90% of a training step (measured). Here every output plane is accumulated tap by tap, each tap one
// contiguous loop over the whole plane that the compiler vectorizes; planes are independent, so OpenMP splits
// them without locks.
//
// One loop per tap, in "wide" layout: an input plane is copied zero-padded and split into its stride x stride
// phases (phase (a, b) holds the padded plane's pixels (a + stride * h, b + stride * w)), and an output plane is
// kept as rows of a phase's width, the columns past the output's width being padding. Tap (i, j) then reads
// output position k from phase (i % stride, j % stride) at k + (i / stride) * phase_w + j / stride, for every k of
// the plane at once: no bounds per row, no strided access. Rows only as long as the plane's width ran scalar on
// the 14x14 and 7x7 layers, and strided rows (the stem, stride-2 layers) several times slower (measured).
//
// Calling convention (MindSpore aot): params holds the inputs, then the output. Every function takes a last
// input `geometry`, int32 [stride, padding], the same for both spatial axes.
//   DirectConv           (x, weight, geometry)          -> y
//   DirectConvInputGrad  (dy, weight, x, geometry)      -> dx   (x gives the input shape only)
//   DirectConvWeightGrad (dy, x, weight, geometry)      -> dweight (weight gives the shape only)
// The number of groups is C_in / weight.shape[1]. Returns nonzero on any shape or type it does not handle.
// No unroll-and-jam: GCC jammed two taps' loops into one that ran scalar, at a third of the vector loop's speed
// (measured). Set before the includes, for every function of the file.
#pragma GCC optimize("no-loop-unroll-and-jam")
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Shape {
  int64_t n, c, h, w;
};

struct Conv {
  Shape x, y;
  int64_t kh, kw, cin_per_group, cout_per_group, stride, pad;
  // Wide layout: an input plane is stride * stride phases of phase_h x phase_w (phase_size values each), plus one
  // row that the last taps' reads past the last phase run into; an output plane is y.h rows of phase_w.
  int64_t phase_h, phase_w, phase_size, wide_in, wide_out;

  void set_layout() {
    phase_h = (x.h + 2 * pad + stride - 1) / stride;
    phase_w = (x.w + 2 * pad + stride - 1) / stride;
    phase_size = phase_h * phase_w;
    wide_in = stride * stride * phase_size + phase_w;
    wide_out = y.h * phase_w;
  }

  // The padded input rows (or columns) that phase a holds are a + stride * p; of them, p in [*lo, *hi) lie
  // inside the input (between pad and size - 1 + pad).
  void inside(int64_t a, int64_t size, int64_t *lo, int64_t *hi) const {
    const int64_t first = pad - a;  // a + stride * p >= pad
    *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
    const int64_t last = size - 1 + pad - a;  // a + stride * p <= size - 1 + pad
    *hi = last < 0 ? 0 : last / stride + 1;
    if (*lo > *hi) *lo = *hi;
  }

  // Calls f(input_index, wide_index, count) for every run of input positions of a plane that lie in one row of
  // one phase: input positions input_index + stride * q, wide positions wide_index + q, for q in [0, count).
  // Every input position lies in exactly one phase.
  template <typename F>
  void for_each_input_run(F f) const {
    for (int64_t a = 0; a < stride; ++a) {
      int64_t row_lo, row_hi;
      inside(a, x.h, &row_lo, &row_hi);
      for (int64_t b = 0; b < stride; ++b) {
        int64_t col_lo, col_hi;
        inside(b, x.w, &col_lo, &col_hi);
        const int64_t phase = (a * stride + b) * phase_size;
        for (int64_t p = row_lo; p < row_hi; ++p) {
          f((a + stride * p - pad) * x.w + b - pad + stride * col_lo, phase + p * phase_w + col_lo, col_hi - col_lo);
        }
      }
    }
  }

  // An input plane into wide layout (padding zero), and a wide gradient back into an input plane.
  void widen_input(const float *plane, float *wide) const {
    std::memset(wide, 0, sizeof(float) * wide_in);
    for_each_input_run([&](int64_t in, int64_t w, int64_t count) {
      if (stride == 1) {
        std::memcpy(wide + w, plane + in, sizeof(float) * count);
      } else {
        for (int64_t q = 0; q < count; ++q) wide[w + q] = plane[in + stride * q];
      }
    });
  }

  void narrow_input(const float *wide, float *plane) const {
    for_each_input_run([&](int64_t in, int64_t w, int64_t count) {
      if (stride == 1) {
        std::memcpy(plane + in, wide + w, sizeof(float) * count);
      } else {
        for (int64_t q = 0; q < count; ++q) plane[in + stride * q] = wide[w + q];
      }
    });
  }

  // An output plane into wide layout (the padding columns zero, so that they add nothing to gradients), and back.
  void widen_output(const float *plane, float *wide) const {
    for (int64_t h = 0; h < y.h; ++h) {
      std::memcpy(wide + h * phase_w, plane + h * y.w, sizeof(float) * y.w);
      std::memset(wide + h * phase_w + y.w, 0, sizeof(float) * (phase_w - y.w));
    }
  }

  void narrow_output(const float *wide, float *plane) const {
    for (int64_t h = 0; h < y.h; ++h) std::memcpy(plane + h * y.w, wide + h * phase_w, sizeof(float) * y.w);
  }
};

bool all_float32(int nparam, const char **dtypes, int geometry_index) {
  for (int i = 0; i < nparam; ++i) {
    if (i == geometry_index) continue;
    if (std::string(dtypes[i]) != "float32") return false;
  }
  return true;
}

Shape shape4(int *ndims, int64_t **shapes, int i) {
  return Shape{shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3]};
}

// Checks the shapes and fills `conv`. x, y: activation tensors; w: weight; g: geometry.
bool describe(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int xi, int yi, int wi,
              int gi, Conv *conv) {
  if (!all_float32(nparam, dtypes, gi)) return false;
  if (std::string(dtypes[gi]) != "int32" || ndims[gi] != 1 || shapes[gi][0] != 2) return false;
  if (ndims[xi] != 4 || ndims[yi] != 4 || ndims[wi] != 4) return false;
  const int32_t *geometry = static_cast<const int32_t *>(params[gi]);
  conv->x = shape4(ndims, shapes, xi);
  conv->y = shape4(ndims, shapes, yi);
  conv->kh = shapes[wi][2];
  conv->kw = shapes[wi][3];
  conv->cin_per_group = shapes[wi][1];
  conv->stride = geometry[0];
  conv->pad = geometry[1];
  if (conv->stride < 1 || conv->pad < 0 || conv->cin_per_group < 1) return false;
  if (conv->x.c % conv->cin_per_group != 0) return false;
  int64_t groups = conv->x.c / conv->cin_per_group;
  if (shapes[wi][0] != conv->y.c || conv->y.c % groups != 0 || conv->x.n != conv->y.n) return false;
  conv->cout_per_group = conv->y.c / groups;
  conv->set_layout();
  return conv->y.h == (conv->x.h + 2 * conv->pad - conv->kh) / conv->stride + 1 &&
         conv->y.w == (conv->x.w + 2 * conv->pad - conv->kw) / conv->stride + 1;
}

bool same_shape(int *ndims, int64_t **shapes, int a, int b) {
  if (ndims[a] != ndims[b]) return false;
  for (int d = 0; d < ndims[a]; ++d) {
    if (shapes[a][d] != shapes[b][d]) return false;
  }
  return true;
}

// Calls tap(index, offset) for every tap (i, j) of the kernel: index i * kw + j of its weight, offset where it
// reads an output position's input in a wide input plane, relative to that position. Forced inline: GCC left such
// walks out of line inside the OpenMP regions, which cost 7-10% (measured).
template <typename Tap>
inline __attribute__((always_inline)) void for_each_tap(const Conv &c, Tap tap) {
  for (int64_t i = 0; i < c.kh; ++i) {
    for (int64_t j = 0; j < c.kw; ++j) {
      tap(i * c.kw + j, ((i % c.stride) * c.stride + j % c.stride) * c.phase_size + (i / c.stride) * c.phase_w +
                            j / c.stride);
    }
  }
}

// The wide input planes of one (image, group), made once for every output plane or filter that reads them (the
// stem's 3 input planes serve its 32 output channels).
class WideInputs {
 public:
  WideInputs(const Conv &c, const float *x) : c_(c), x_(x), planes_(c.cin_per_group * c.wide_in) {}

  // Input channel `ci` of group `group` of image `n`, in wide layout.
  const float *get(int64_t n, int64_t group, int64_t ci) {
    const int64_t key = n * c_.x.c + group * c_.cin_per_group;
    if (key != held_) {
      for (int64_t k = 0; k < c_.cin_per_group; ++k) {
        c_.widen_input(x_ + (key + k) * c_.x.h * c_.x.w, planes_.data() + k * c_.wide_in);
      }
      held_ = key;
    }
    return planes_.data() + ci * c_.wide_in;
  }

 private:
  const Conv &c_;
  const float *x_;
  std::vector<float> planes_;
  int64_t held_ = -1;
};

}  // namespace

extern "C" int DirectConv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  Conv c;
  if (nparam != 4 || !describe(nparam, params, ndims, shapes, dtypes, 0, 3, 1, 2, &c)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[3]);
  const int64_t planes = c.y.n * c.y.c, y_plane = c.y.h * c.y.w;
#pragma omp parallel
  {
    WideInputs inputs(c, x);
    std::vector<float> wide_out(c.wide_out);
    float *out = wide_out.data();
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t n = p / c.y.c, co = p % c.y.c, group = co / c.cout_per_group;
      std::memset(out, 0, sizeof(float) * c.wide_out);
      for (int64_t ci = 0; ci < c.cin_per_group; ++ci) {
        const float *in = inputs.get(n, group, ci), *taps = w + (co * c.cin_per_group + ci) * c.kh * c.kw;
        for_each_tap(c, [&](int64_t tap, int64_t offset) {
          const float weight = taps[tap], *source = in + offset;
          for (int64_t k = 0; k < c.wide_out; ++k) out[k] += weight * source[k];
        });
      }
      c.narrow_output(out, y + p * y_plane);
    }
  }
  return 0;
}

extern "C" int DirectConvInputGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  Conv c;
  if (nparam != 5 || !describe(nparam, params, ndims, shapes, dtypes, 4, 0, 1, 3, &c)) return 1;
  if (!same_shape(ndims, shapes, 2, 4)) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[4]);
  const int64_t planes = c.x.n * c.x.c, x_plane = c.x.h * c.x.w, y_plane = c.y.h * c.y.w;
#pragma omp parallel
  {
    std::vector<float> wide_grad(c.wide_in), wide_dout(c.wide_out);
    float *grad = wide_grad.data(), *dout = wide_dout.data();
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t n = p / c.x.c, cin = p % c.x.c;
      const int64_t group = cin / c.cin_per_group, ci = cin % c.cin_per_group;
      std::memset(grad, 0, sizeof(float) * c.wide_in);
      for (int64_t k = 0; k < c.cout_per_group; ++k) {
        const int64_t co = group * c.cout_per_group + k;
        c.widen_output(dy + (n * c.y.c + co) * y_plane, dout);
        const float *taps = w + (co * c.cin_per_group + ci) * c.kh * c.kw;
        for_each_tap(c, [&](int64_t tap, int64_t offset) {
          const float weight = taps[tap];
          float *target = grad + offset;
          for (int64_t q = 0; q < c.wide_out; ++q) target[q] += weight * dout[q];
        });
      }
      c.narrow_input(grad, dx + p * x_plane);
    }
  }
  return 0;
}

extern "C" int DirectConvWeightGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  Conv c;
  if (nparam != 5 || !describe(nparam, params, ndims, shapes, dtypes, 1, 0, 4, 3, &c)) return 1;
  if (!same_shape(ndims, shapes, 2, 4)) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  float *dw = static_cast<float *>(params[4]);
  const int64_t y_plane = c.y.h * c.y.w;
  const int64_t filters = c.y.c * c.cin_per_group;
  const int64_t taps = c.kh * c.kw;
#pragma omp parallel
  {
    // Each thread owns a contiguous range of filters and walks the images outermost, so that one widening of an
    // (image, group)'s planes serves all of the range's filters on them. Each tap's products over a plane are
    // summed in float (the padding columns of `dout` are zero and add nothing), the planes' sums in double.
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t lo = filters * thread / threads, hi = filters * (thread + 1) / threads;
    std::vector<double> totals((hi - lo) * taps, 0.0);
    std::vector<float> wide_dout(c.wide_out);
    float *dout = wide_dout.data();
    WideInputs inputs(c, x);
    for (int64_t n = 0; n < c.x.n; ++n) {
      int64_t widened = -1;  // the output channel whose gradient `dout` holds
      for (int64_t f = lo; f < hi; ++f) {
        const int64_t co = f / c.cin_per_group, ci = f % c.cin_per_group, group = co / c.cout_per_group;
        const float *in = inputs.get(n, group, ci);
        if (co != widened) {
          c.widen_output(dy + (n * c.y.c + co) * y_plane, dout);
          widened = co;
        }
        double *filter_totals = totals.data() + (f - lo) * taps;
        for_each_tap(c, [&](int64_t tap, int64_t offset) {
          const float *source = in + offset;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t k = 0; k < c.wide_out; ++k) sum += dout[k] * source[k];
          filter_totals[tap] += sum;
        });
      }
    }
    for (int64_t f = lo; f < hi; ++f) {
      for (int64_t t = 0; t < taps; ++t) dw[f * taps + t] = static_cast<float>(totals[(f - lo) * taps + t]);
    }
  }
  return 0;
}
