// BatchNorm (with an optional ReLU) for training on the CPU, as XLA FFI handlers.
//
// Four handlers over float32 activations whose last dimension is the channels, seen
// as M rows of C channels:
//   inception_flax_bn_stats       (y)                   -> [sum y, sum y^2]         (2, C)
//   inception_flax_bn_apply       (y, a, b)             -> z = y a + b, ReLU'd if relu
//   inception_flax_bn_grad_stats  (g, y, a, b, mean)    -> [sum gz, sum gz (y - mean)]
//   inception_flax_bn_input_grad  (g, y, a, b, k1, k0)  -> gz a + y k1 + k0
// where gz is g where z > 0 (g everywhere without the ReLU), and a, b, k1, k0 are
// per-channel coefficients computed by inception_flax/cpu/batch_norm.py. Each pass reads
// its inputs once: statistics one read of y, the forward one read and one write, the
// backward two reads for the sums and two reads and a write for the gradient. z is
// computed the same way (y * a + b, no fused multiply-add: -ffp-contract=off) in the
// forward output and both backward passes, so the ReLU mask agrees between them.
//
// Rows are split among `threads` OpenMP threads. The sums are taken in float over
// blocks of rows and added in double, then over the threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;
using inception_flax::ForRows;
using inception_flax::TeamSize;
using Vec = ffi::Buffer<ffi::F32, 1>;
using Sums = ffi::Buffer<ffi::F32, 2>;
constexpr int64_t kBlock = 32;  // rows summed in float before adding into double

#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define R __restrict__

CLONES void StatsRows(const float* R y, int64_t lo, int64_t hi, int64_t C, double* R s1,
                      double* R s2, float* R b1, float* R b2) {
  for (int64_t r0 = lo; r0 < hi; r0 += kBlock) {
    int64_t r1 = std::min(hi, r0 + kBlock);
    for (int64_t c = 0; c < C; ++c) b1[c] = b2[c] = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const float* R yr = y + r * C;
      for (int64_t c = 0; c < C; ++c) {
        float v = yr[c];
        b1[c] += v;
        b2[c] += v * v;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += b1[c];
      s2[c] += b2[c];
    }
  }
}

CLONES void GradStatsRows(const float* R g, const float* R y, const float* R a, const float* R b,
                          const float* R m, bool relu, int64_t lo, int64_t hi, int64_t C,
                          double* R s1, double* R s2, float* R b1, float* R b2) {
  for (int64_t r0 = lo; r0 < hi; r0 += kBlock) {
    int64_t r1 = std::min(hi, r0 + kBlock);
    for (int64_t c = 0; c < C; ++c) b1[c] = b2[c] = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const float* R gr = g + r * C;
      const float* R yr = y + r * C;
      for (int64_t c = 0; c < C; ++c) {
        float v = yr[c];
        float gz = (!relu || v * a[c] + b[c] > 0.f) ? gr[c] : 0.f;
        b1[c] += gz;
        b2[c] += gz * (v - m[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += b1[c];
      s2[c] += b2[c];
    }
  }
}

CLONES void ApplyRows(const float* R y, const float* R a, const float* R b, bool relu, int64_t lo,
                      int64_t hi, int64_t C, float* R out) {
  for (int64_t r = lo; r < hi; ++r) {
    const float* R yr = y + r * C;
    float* R o = out + r * C;
    if (relu) {
      for (int64_t c = 0; c < C; ++c) {
        float z = yr[c] * a[c] + b[c];
        o[c] = z > 0.f ? z : 0.f;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = yr[c] * a[c] + b[c];
    }
  }
}

CLONES void InputGradRows(const float* R g, const float* R y, const float* R a, const float* R b,
                          const float* R k1, const float* R k0, bool relu, int64_t lo, int64_t hi,
                          int64_t C, float* R dy) {
  for (int64_t r = lo; r < hi; ++r) {
    const float* R gr = g + r * C;
    const float* R yr = y + r * C;
    float* R d = dy + r * C;
    for (int64_t c = 0; c < C; ++c) {
      float v = yr[c];
      float ga = (!relu || v * a[c] + b[c] > 0.f) ? gr[c] * a[c] : 0.f;
      d[c] = ga + v * k1[c] + k0[c];
    }
  }
}

// Two per-channel sums over all rows into out[0, :] and out[1, :].
template <typename Body>
void TwoSums(int64_t rows, int64_t C, int64_t threads, float* out, Body body) {
  int team = TeamSize(threads, rows * C);
  std::vector<double> acc(static_cast<size_t>(2 * C * team), 0.0);
  ForRows(rows, C, team, [&](int64_t lo, int64_t hi, int t) {
    std::vector<float> block(static_cast<size_t>(2 * C));
    double* s = acc.data() + 2 * C * t;
    body(lo, hi, s, s + C, block.data(), block.data() + C);
  });
  for (int64_t c = 0; c < 2 * C; ++c) {
    double s = 0;
    for (int t = 0; t < team; ++t) s += acc[2 * C * t + c];
    out[c] = static_cast<float>(s);
  }
}

int64_t Channels(const ffi::AnyBuffer& y) {
  auto d = y.dimensions();
  return d.size() == 0 ? 1 : d[d.size() - 1];
}

const float* Data(const ffi::AnyBuffer& x) { return static_cast<const float*>(x.untyped_data()); }

ffi::Error Stats(ffi::AnyBuffer y, ffi::Result<Sums> out, int64_t threads) {
  int64_t C = Channels(y), rows = y.element_count() / C;
  TwoSums(rows, C, threads, out->typed_data(),
          [&](int64_t lo, int64_t hi, double* s1, double* s2, float* b1, float* b2) {
            StatsRows(Data(y), lo, hi, C, s1, s2, b1, b2);
          });
  return ffi::Error::Success();
}

ffi::Error Apply(ffi::AnyBuffer y, Vec a, Vec b, ffi::Result<ffi::AnyBuffer> out, int64_t threads,
                 bool relu) {
  int64_t C = Channels(y), rows = y.element_count() / C;
  float* o = static_cast<float*>(out->untyped_data());
  ForRows(rows, C, threads, [&](int64_t lo, int64_t hi, int) {
    ApplyRows(Data(y), a.typed_data(), b.typed_data(), relu, lo, hi, C, o);
  });
  return ffi::Error::Success();
}

ffi::Error GradStats(ffi::AnyBuffer g, ffi::AnyBuffer y, Vec a, Vec b, Vec mean,
                     ffi::Result<Sums> out, int64_t threads, bool relu) {
  int64_t C = Channels(y), rows = y.element_count() / C;
  TwoSums(rows, C, threads, out->typed_data(),
          [&](int64_t lo, int64_t hi, double* s1, double* s2, float* b1, float* b2) {
            GradStatsRows(Data(g), Data(y), a.typed_data(), b.typed_data(), mean.typed_data(),
                          relu, lo, hi, C, s1, s2, b1, b2);
          });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::AnyBuffer g, ffi::AnyBuffer y, Vec a, Vec b, Vec k1, Vec k0,
                     ffi::Result<ffi::AnyBuffer> dy, int64_t threads, bool relu) {
  int64_t C = Channels(y), rows = y.element_count() / C;
  float* d = static_cast<float*>(dy->untyped_data());
  ForRows(rows, C, threads, [&](int64_t lo, int64_t hi, int) {
    InputGradRows(Data(g), Data(y), a.typed_data(), b.typed_data(), k1.typed_data(),
                  k0.typed_data(), relu, lo, hi, C, d);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_bn_stats, Stats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<Sums>()
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_bn_apply, Apply,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_bn_grad_stats, GradStats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Ret<Sums>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_bn_input_grad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Arg<Vec>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("relu"));
