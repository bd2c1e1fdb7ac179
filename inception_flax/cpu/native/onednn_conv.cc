// 2-D convolutions on the CPU through oneDNN, as XLA FFI handlers.
//
// Three handlers, each for float32 NHWC activations and HWIO kernels:
//   inception_flax_conv_forward      (x, w)  -> y
//   inception_flax_conv_input_grad   (dy, w) -> dx
//   inception_flax_conv_kernel_grad  (x, dy) -> dw
// with the strides and the four paddings as attributes, and `threads`, the
// OpenMP threads one call may use. inception_flax/cpu/native.py builds this file
// and registers the handlers; see there for why.
//
// oneDNN keeps the activations in NHWC (what XLA hands over, no copy) and picks
// its own kernel layout; the kernel (a few MB at most) is reordered from or to
// HWIO on each call. A primitive is created once per shape and kept.
//
// XLA:CPU runs independent operations at the same time (two branches of a block,
// the devices of a multi-device CPU), so one primitive may run on two threads at
// once. oneDNN's own scratchpad is shared by all primitives in this build, which
// made two concurrent kernel gradients wait forever on each other's barrier: each
// call brings its own scratchpad instead (a buffer per calling thread).

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" void omp_set_num_threads(int);

namespace {

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Dt = dnnl::memory::data_type;

enum Kind { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  int64_t n, h, w, c;      // input
  int64_t kh, kw, o;       // kernel
  int64_t oh, ow;          // output
  int64_t sh, sw;          // strides
  int64_t pt, pb, pl, pr;  // padding: top, bottom, left, right

  std::string Key(Kind kind) const {
    char buf[320];
    std::snprintf(buf, sizeof(buf), "%d/%ld,%ld,%ld,%ld/%ld,%ld,%ld/%ld,%ld/%ld,%ld/%ld,%ld,%ld,%ld",
                  static_cast<int>(kind), (long)n, (long)h, (long)w, (long)c, (long)kh, (long)kw,
                  (long)o, (long)oh, (long)ow, (long)sh, (long)sw, (long)pt, (long)pb, (long)pl,
                  (long)pr);
    return buf;
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, Dt::f32, Tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, o, oh, ow}, Dt::f32, Tag::nhwc); }
  memory::desc KernelHwio() const { return memory::desc({o, c, kh, kw}, Dt::f32, Tag::hwio); }
  memory::desc KernelAny() const { return memory::desc({o, c, kh, kw}, Dt::f32, Tag::any); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadLow() const { return {pt, pl}; }
  memory::dims PadHigh() const { return {pb, pr}; }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

struct Plan {
  dnnl::primitive conv;
  memory::desc scratchpad;  // what one run of `conv` needs
  memory::desc reorder_scratchpad;
  memory::desc kernel;      // the layout the primitive wants its kernel (or gives its gradient) in
  bool reorder = false;     // whether that differs from HWIO
  dnnl::reorder to_kernel;  // HWIO -> kernel (forward, input gradient)
  dnnl::reorder to_hwio;    // kernel -> HWIO (kernel gradient)
};

Plan MakePlan(const Geometry& g, Kind kind) {
  const dnnl::primitive_attr attr = UserScratchpad();
  auto hint = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.KernelAny(), g.Dst(), g.Strides(), g.PadLow(), g.PadHigh(), attr);
  Plan plan;
  if (kind == kForward) {
    plan.conv = dnnl::convolution_forward(hint);
    plan.kernel = hint.weights_desc();
    plan.scratchpad = hint.scratchpad_desc();
  } else if (kind == kInputGrad) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.KernelAny(), g.Dst(),
        g.Strides(), g.PadLow(), g.PadHigh(), hint, attr);
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.kernel = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.KernelAny(), g.Dst(),
        g.Strides(), g.PadLow(), g.PadHigh(), hint, attr);
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.kernel = pd.diff_weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  }
  plan.reorder = plan.kernel != g.KernelHwio();
  if (plan.reorder) {
    auto pd = kind == kKernelGrad
        ? dnnl::reorder::primitive_desc(Engine(), plan.kernel, Engine(), g.KernelHwio(), attr)
        : dnnl::reorder::primitive_desc(Engine(), g.KernelHwio(), Engine(), plan.kernel, attr);
    (kind == kKernelGrad ? plan.to_hwio : plan.to_kernel) = dnnl::reorder(pd);
    plan.reorder_scratchpad = pd.scratchpad_desc();
  }
  return plan;
}

const Plan& GetPlan(const Geometry& g, Kind kind) {
  static std::mutex mu;
  static auto* plans = new std::unordered_map<std::string, std::unique_ptr<Plan>>();
  std::string key = g.Key(kind);
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans->find(key);
  if (it == plans->end()) {
    it = plans->emplace(key, std::make_unique<Plan>(MakePlan(g, kind))).first;
  }
  return *it->second;
}

// A scratchpad of `desc`'s size from this thread's buffer, which only grows.
memory Scratchpad(const memory::desc& desc) {
  thread_local std::unique_ptr<char[]> buffer;
  thread_local size_t size = 0;
  size_t need = desc.get_size();
  if (need > size) {
    buffer.reset(new char[need]);
    size = need;
  }
  return memory(desc, Engine(), size ? buffer.get() : nullptr);
}

// x: the input (or its gradient), w: the kernel (or its gradient), y: the output (or its
// gradient), all as XLA laid them out.
ffi::Error Run(Kind kind, const Geometry& g, int64_t threads, void* x, void* w, void* y) {
  try {
    if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
    const Plan& plan = GetPlan(g, kind);
    dnnl::stream stream(Engine());
    memory xm(g.Src(), Engine(), x), ym(g.Dst(), Engine(), y), wm(g.KernelHwio(), Engine(), w);
    memory km = plan.reorder ? memory(plan.kernel, Engine()) : wm;
    if (plan.reorder && kind != kKernelGrad) {
      plan.to_kernel.execute(stream, {{DNNL_ARG_FROM, wm}, {DNNL_ARG_TO, km},
                                      {DNNL_ARG_SCRATCHPAD, Scratchpad(plan.reorder_scratchpad)}});
    }
    memory scratch = Scratchpad(plan.scratchpad);
    if (kind == kForward) {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, ym},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == kInputGrad) {
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_WEIGHTS, km},
                                 {DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_WEIGHTS, km},
                                 {DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    stream.wait();
    if (plan.reorder && kind == kKernelGrad) {
      plan.to_hwio.execute(stream, {{DNNL_ARG_FROM, km}, {DNNL_ARG_TO, wm},
                                    {DNNL_ARG_SCRATCHPAD, Scratchpad(plan.reorder_scratchpad)}});
      stream.wait();
    }
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pb, pl, pr};
}

using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Out = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error Forward(F32 x, F32 w, F32Out y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr, int64_t threads) {
  Geometry g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(kForward, g, threads, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error InputGrad(F32 dy, F32 w, F32Out dx, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                     int64_t pl, int64_t pr, int64_t threads) {
  Geometry g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(kInputGrad, g, threads, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error KernelGrad(F32 x, F32 dy, F32Out dw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr, int64_t threads) {
  Geometry g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return Run(kKernelGrad, g, threads, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

}  // namespace

#define CONV_BINDING                                                                        \
  ffi::Ffi::Bind()                                                                         \
      .Arg<F32>()                                                                          \
      .Arg<F32>()                                                                          \
      .Ret<F32>()                                                                          \
      .Attr<int64_t>("sh").Attr<int64_t>("sw")                                             \
      .Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl").Attr<int64_t>("pr")    \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_conv_forward, Forward, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_conv_input_grad, InputGrad, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(inception_flax_conv_kernel_grad, KernelGrad, CONV_BINDING);
