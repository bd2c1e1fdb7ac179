// Max pooling with its gradient on the CPU, as XLA FFI handlers.
//
// Float32 NHWC maps, a k x k window at stride s, padded by pt rows on top and pl
// columns on the left (and as far as the output's size needs on the other sides);
// padded positions never win:
//   inception_flax_max_pool       (x)        -> y, which    y: (N, OH, OW, C) float32,
//                                                           which: the same shape, uint8
//   inception_flax_max_pool_grad  (g, which) -> dx          (N, H, W, C) float32
// `which` is the window tap (row * k + column) each output took its maximum from: the
// first one in row-major window order among equals, as XLA's select_and_scatter and
// inception_flax/cpu/forms.py's `max_pool` choose. A NaN in a window wins, so
// that it propagates as through `jnp.maximum`. The gradient adds each output's
// gradient at the position its maximum came from, one tap of the window at a time so
// that the loops over channels vectorise.
//
// The forward pass splits the N * OH output rows among the threads; the gradient splits
// the images (windows overlap within an image, not across images).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;
using inception_flax::ForRows;

#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define R __restrict__

struct Window {
  int64_t k, s, pt, pl, H, W, OH, OW, C;
};

// Output row `row` (image row / OH, output row % OH) of y and which.
CLONES void PoolRow(const float* R x, const Window& w, int64_t row, float* R y, uint8_t* R which) {
  int64_t n = row / w.OH, oh = row % w.OH, C = w.C;
  const float* R image = x + n * w.H * w.W * C;
  for (int64_t ow = 0; ow < w.OW; ++ow) {
    float* R yo = y + (row * w.OW + ow) * C;
    uint8_t* R wo = which + (row * w.OW + ow) * C;
    bool first = true;
    for (int64_t a = 0; a < w.k; ++a) {
      int64_t ih = oh * w.s - w.pt + a;
      if (ih < 0 || ih >= w.H) continue;
      for (int64_t b = 0; b < w.k; ++b) {
        int64_t iw = ow * w.s - w.pl + b;
        if (iw < 0 || iw >= w.W) continue;
        const float* R xi = image + (ih * w.W + iw) * C;
        uint8_t tap = static_cast<uint8_t>(a * w.k + b);
        if (first) {
          for (int64_t c = 0; c < C; ++c) {
            yo[c] = xi[c];
            wo[c] = tap;
          }
          first = false;
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          float v = xi[c], m = yo[c];
          bool take = (v > m || v != v) && m == m;  // a NaN already taken stays
          yo[c] = take ? v : m;
          wo[c] = take ? tap : wo[c];
        }
      }
    }
    if (first) {  // a window entirely in the padding: -inf, as a -inf-padded pool gives
      for (int64_t c = 0; c < C; ++c) {
        yo[c] = -__builtin_inff();
        wo[c] = 0;
      }
    }
  }
}

// The gradient of image n: zero, then each output's gradient added at its maximum.
CLONES void GradImage(const float* R g, const uint8_t* R which, const Window& w, int64_t n,
                      float* R dx) {
  int64_t C = w.C;
  float* R d = dx + n * w.H * w.W * C;
  std::memset(d, 0, sizeof(float) * w.H * w.W * C);
  for (int64_t oh = 0; oh < w.OH; ++oh) {
    for (int64_t ow = 0; ow < w.OW; ++ow) {
      int64_t o = ((n * w.OH + oh) * w.OW + ow) * C;
      const float* R go = g + o;
      const uint8_t* R wo = which + o;
      for (int64_t a = 0; a < w.k; ++a) {
        int64_t ih = oh * w.s - w.pt + a;
        if (ih < 0 || ih >= w.H) continue;
        for (int64_t b = 0; b < w.k; ++b) {
          int64_t iw = ow * w.s - w.pl + b;
          if (iw < 0 || iw >= w.W) continue;
          uint8_t tap = static_cast<uint8_t>(a * w.k + b);
          float* R di = d + (ih * w.W + iw) * C;
          for (int64_t c = 0; c < C; ++c) di[c] += wo[c] == tap ? go[c] : 0.f;
        }
      }
    }
  }
}

Window Shape(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out, int64_t k, int64_t s,
             int64_t pt, int64_t pl) {
  return {k, s, pt, pl, in[1], in[2], out[1], out[2], in[3]};
}

ffi::Error MaxPool(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> which, int64_t k, int64_t s, int64_t pt,
                   int64_t pl, int64_t threads) {
  if (x.dimensions().size() != 4 || k * k > 256) {
    return ffi::Error::InvalidArgument("max_pool: NHWC input and windows of at most 16x16");
  }
  Window w = Shape(x.dimensions(), y->dimensions(), k, s, pt, pl);
  const float* xp = static_cast<const float*>(x.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  uint8_t* wp = static_cast<uint8_t*>(which->untyped_data());
  int64_t rows = y->dimensions()[0] * w.OH;
  ForRows(rows, w.OW * w.C, threads, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) PoolRow(xp, w, r, yp, wp);
  });
  return ffi::Error::Success();
}

ffi::Error MaxPoolGrad(ffi::AnyBuffer g, ffi::AnyBuffer which, ffi::Result<ffi::AnyBuffer> dx,
                       int64_t k, int64_t s, int64_t pt, int64_t pl, int64_t threads) {
  Window w = Shape(dx->dimensions(), g.dimensions(), k, s, pt, pl);
  const float* gp = static_cast<const float*>(g.untyped_data());
  const uint8_t* wp = static_cast<const uint8_t*>(which.untyped_data());
  float* dp = static_cast<float*>(dx->untyped_data());
  ForRows(dx->dimensions()[0], w.H * w.W * w.C, threads, [&](int64_t lo, int64_t hi, int) {
    for (int64_t n = lo; n < hi; ++n) GradImage(gp, wp, w, n, dp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_max_pool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_max_pool_grad, MaxPoolGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("s")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("threads"));
