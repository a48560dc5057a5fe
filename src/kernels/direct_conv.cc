// Direct grouped convolution (NCHW, float32) for MindSpore CPU custom "aot" operators: forward, gradient of the
// input and gradient of the weight.
//
// Why: MindSpore's CPU Conv2D hands oneDNN plain NCHW tensors, and for kernels larger than 1x1 (MobileNetV2's
// depthwise convolutions and its first convolution) oneDNN then falls back to its reference implementation,
// which took 90% of a training step (measured). Here every output plane is accumulated tap by tap with
// contiguous inner loops the compiler vectorizes; planes are independent, so OpenMP splits them without locks.
// With stride s > 1 the input plane is first split into its s x s phases (phase (a, b) holds the pixels
// (a + s * h, b + s * w)), so that every tap reads (or, for the input's gradient, writes) a contiguous row of one
// phase instead of every s-th element of a row, which the compiler cannot vectorize: a strided row took the
// stem (3 input channels, stride 2) and the stride-2 depthwise layers several times a stride-1 layer's time.
//
// Calling convention (MindSpore aot): params holds the inputs, then the output. Every function takes a last
// input `geometry`, int32 [stride, padding], the same for both spatial axes.
//   DirectConv           (x, weight, geometry)          -> y
//   DirectConvInputGrad  (dy, weight, x, geometry)      -> dx   (x gives the input shape only)
//   DirectConvWeightGrad (dy, x, weight, geometry)      -> dweight (weight gives the shape only)
// The number of groups is C_in / weight.shape[1]. Returns nonzero on any shape or type it does not handle.
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
  // An input plane in phase layout: stride * stride phases of phase_h x phase_w, each phase_size values (with
  // stride 1, the plane itself).
  int64_t phase_h, phase_w, phase_size, phased_plane;

  void set_phases() {
    phase_h = (x.h + stride - 1) / stride;
    phase_w = (x.w + stride - 1) / stride;
    phase_size = phase_h * phase_w;
    phased_plane = stride * stride * phase_size;
  }

  // Where input position (h, w) = (o * stride + offset, ...) lies in phase layout: offset = a + stride * d with
  // a in [0, stride) picks the phase, d shifts the position inside it.
  void phase_of(int64_t offset, int64_t *a, int64_t *d) const {
    *a = ((offset % stride) + stride) % stride;
    *d = (offset - *a) / stride;
  }

  // An input plane into phase layout, and back (every input position lies in exactly one phase).
  void split_phases(const float *plane, float *phased) const {
    for (int64_t a = 0; a < stride; ++a) {
      for (int64_t b = 0; b < stride; ++b) {
        float *phase = phased + (a * stride + b) * phase_size;
        for (int64_t h = a, ph = 0; h < x.h; h += stride, ++ph) {
          for (int64_t w = b, pw = 0; w < x.w; w += stride, ++pw) phase[ph * phase_w + pw] = plane[h * x.w + w];
        }
      }
    }
  }

  void merge_phases(const float *phased, float *plane) const {
    for (int64_t a = 0; a < stride; ++a) {
      for (int64_t b = 0; b < stride; ++b) {
        const float *phase = phased + (a * stride + b) * phase_size;
        for (int64_t h = a, ph = 0; h < x.h; h += stride, ++ph) {
          for (int64_t w = b, pw = 0; w < x.w; w += stride, ++pw) plane[h * x.w + w] = phase[ph * phase_w + pw];
        }
      }
    }
  }

  // Output positions [lo, hi) whose input position o * stride - pad + tap lies inside [0, size).
  void valid(int64_t tap, int64_t size, int64_t out_size, int64_t *lo, int64_t *hi) const {
    int64_t first = pad - tap;  // o * stride >= pad - tap
    *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
    int64_t last = size - 1 + pad - tap;  // o * stride <= size - 1 + pad - tap
    *hi = last < 0 ? 0 : last / stride + 1;
    if (*hi > out_size) *hi = out_size;
    if (*lo > *hi) *lo = *hi;
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
  conv->set_phases();
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

// Walks every tap (i, j) of the kernel and every output row it touches, calling
// row(tap, x_offset, y_offset, ow_lo, ow_hi): input position (oh * stride - pad + i, ow * stride - pad + j) is
// x_offset + ow within an input plane in phase layout, output position (oh, ow) is y_offset + ow within an output
// plane, for ow in [ow_lo, ow_hi). The three kernels differ only in what they do with each row. Forced inline:
// GCC left it out of line inside the OpenMP regions, which cost 7-10% (measured).
template <typename Row>
inline __attribute__((always_inline)) void for_each_tap_row(const Conv &c, Row row) {
  for (int64_t i = 0; i < c.kh; ++i) {
    int64_t oh_lo, oh_hi, a, dh;
    c.valid(i, c.x.h, c.y.h, &oh_lo, &oh_hi);
    c.phase_of(i - c.pad, &a, &dh);
    for (int64_t j = 0; j < c.kw; ++j) {
      int64_t ow_lo, ow_hi, b, dw;
      c.valid(j, c.x.w, c.y.w, &ow_lo, &ow_hi);
      c.phase_of(j - c.pad, &b, &dw);
      const int64_t phase = (a * c.stride + b) * c.phase_size + dw;
      for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
        row(i * c.kw + j, phase + (oh + dh) * c.phase_w, oh * c.y.w, ow_lo, ow_hi);
      }
    }
  }
}

}  // namespace

extern "C" int DirectConv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  Conv c;
  if (nparam != 4 || !describe(nparam, params, ndims, shapes, dtypes, 0, 3, 1, 2, &c)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[3]);
  const int64_t planes = c.y.n * c.y.c, x_plane = c.x.h * c.x.w, y_plane = c.y.h * c.y.w;
  const int64_t groups = c.x.c / c.cin_per_group;
#pragma omp parallel
  {
    // The phases of one group's input planes, split once for all its output planes (the stem's 3 input planes
    // serve 32 of them).
    std::vector<float> phased(c.stride > 1 ? c.cin_per_group * c.phased_plane : 0);
    int64_t held = -1;  // the (image, group) whose planes `phased` holds
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t n = p / c.y.c, co = p % c.y.c, group = co / c.cout_per_group;
      const float *group_in = x + (n * c.x.c + group * c.cin_per_group) * x_plane;
      if (c.stride > 1 && held != n * groups + group) {
        for (int64_t ci = 0; ci < c.cin_per_group; ++ci) {
          c.split_phases(group_in + ci * x_plane, phased.data() + ci * c.phased_plane);
        }
        held = n * groups + group;
      }
      const float *source = c.stride > 1 ? phased.data() : group_in;
      float *out = y + p * y_plane;
      std::memset(out, 0, sizeof(float) * y_plane);
      for (int64_t ci = 0; ci < c.cin_per_group; ++ci) {
        const float *in = source + ci * c.phased_plane;
        const float *taps = w + (co * c.cin_per_group + ci) * c.kh * c.kw;
        for_each_tap_row(c, [&](int64_t tap, int64_t x_offset, int64_t y_offset, int64_t ow_lo, int64_t ow_hi) {
          const float weight = taps[tap], *in_row = in + x_offset;
          float *out_row = out + y_offset;
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow) out_row[ow] += weight * in_row[ow];
        });
      }
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
    std::vector<float> phased(c.stride > 1 ? c.phased_plane : 0);  // the plane's gradient in phase layout
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t n = p / c.x.c, cin = p % c.x.c;
      const int64_t group = cin / c.cin_per_group, ci = cin % c.cin_per_group;
      float *grad = c.stride > 1 ? phased.data() : dx + p * x_plane;
      std::memset(grad, 0, sizeof(float) * c.phased_plane);
      for (int64_t k = 0; k < c.cout_per_group; ++k) {
        const int64_t co = group * c.cout_per_group + k;
        const float *dout = dy + (n * c.y.c + co) * y_plane;
        const float *taps = w + (co * c.cin_per_group + ci) * c.kh * c.kw;
        for_each_tap_row(c, [&](int64_t tap, int64_t x_offset, int64_t y_offset, int64_t ow_lo, int64_t ow_hi) {
          const float weight = taps[tap], *dout_row = dout + y_offset;
          float *grad_row = grad + x_offset;
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow) grad_row[ow] += weight * dout_row[ow];
        });
      }
      if (c.stride > 1) c.merge_phases(grad, dx + p * x_plane);
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
  const int64_t x_plane = c.x.h * c.x.w, y_plane = c.y.h * c.y.w;
  const int64_t filters = c.y.c * c.cin_per_group;
  const int64_t taps = c.kh * c.kw;
#pragma omp parallel
  {
    // Each thread owns a contiguous range of filters and walks the images outermost, so that one split of a
    // group's input planes serves all of the range's filters on them, and each image's planes stay in cache for
    // all taps. One row of partial sums per filter and tap, added to column by column (vector adds, no
    // horizontal sum per row).
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t lo = filters * thread / threads, hi = filters * (thread + 1) / threads;
    std::vector<float> partial((hi - lo) * taps * c.y.w, 0.0f);
    std::vector<float> phased(c.stride > 1 ? c.cin_per_group * c.phased_plane : 0);
    for (int64_t n = 0; n < c.x.n; ++n) {
      int64_t held = -1;  // the group whose planes of image n `phased` holds
      for (int64_t f = lo; f < hi; ++f) {
        const int64_t co = f / c.cin_per_group, ci = f % c.cin_per_group, group = co / c.cout_per_group;
        const float *group_in = x + (n * c.x.c + group * c.cin_per_group) * x_plane;
        if (c.stride > 1 && held != group) {
          for (int64_t k = 0; k < c.cin_per_group; ++k) {
            c.split_phases(group_in + k * x_plane, phased.data() + k * c.phased_plane);
          }
          held = group;
        }
        const float *in = (c.stride > 1 ? phased.data() : group_in) + ci * c.phased_plane;
        const float *dout = dy + (n * c.y.c + co) * y_plane;
        float *filter_sums = partial.data() + (f - lo) * taps * c.y.w;
        for_each_tap_row(c, [&](int64_t tap, int64_t x_offset, int64_t y_offset, int64_t ow_lo, int64_t ow_hi) {
          const float *in_row = in + x_offset, *dout_row = dout + y_offset;
          float *sums = filter_sums + tap * c.y.w;
#pragma omp simd
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow) sums[ow] += dout_row[ow] * in_row[ow];
        });
      }
    }
    for (int64_t f = lo; f < hi; ++f) {
      for (int64_t t = 0; t < taps; ++t) {
        const float *sums = partial.data() + ((f - lo) * taps + t) * c.y.w;
        double total = 0.0;  // each column summed N * H products in float; the columns are added in double
        for (int64_t ow = 0; ow < c.y.w; ++ow) total += sums[ow];
        dw[f * taps + t] = static_cast<float>(total);
      }
    }
  }
  return 0;
}
