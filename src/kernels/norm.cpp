// Fused RMSNorm, and GroupNorm + GELU (kernels/norm.h).
#include "vlmkit/kernels/norm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../internal.h"
#include "switch.h"
#include "vlmkit/runtime.h"
#include "vec_math.h"

namespace vlmkit {
namespace {
kernels::KernelSwitch g_norm_kernel("set_norm_kernel");
}  // namespace

void set_norm_kernel(const std::string& kernel) { g_norm_kernel.set(kernel); }

std::string norm_kernel() { return g_norm_kernel.get(); }

namespace kernels {
namespace {

constexpr int64_t kGrain = 32768;  // elements below which one thread does the work

inline float rsqrt_acc(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt_acc(double v) { return 1.0 / std::sqrt(v); }

// Rows [begin, end) of x [N, D]: r = 1 / sqrt(mean(x^2) + eps), y = x r w.
template <typename T, typename O>
inline __attribute__((always_inline)) void forward_rows(const T* __restrict x, const typename Acc<T>::type* __restrict w,
                                                        O* __restrict y, typename Acc<T>::type* __restrict rstd,
                                                        int64_t d, double eps, int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  for (int64_t n = begin; n < end; ++n) {
    const T* xr = x + n * d;
    O* yr = y + n * d;
    A ss = 0;
    for (int64_t i = 0; i < d; ++i) {
      const A v = load(xr, i);
      ss += v * v;
    }
    const A r = rsqrt_acc(ss / A(d) + A(eps));
    rstd[n] = r;
    for (int64_t i = 0; i < d; ++i) store(yr, i, A(load(xr, i)) * r * w[i]);
  }
}

// With xhat = x r and gw = g w: dx = r (gw - xhat mean(gw xhat)), dw += g xhat
// (into this thread's row of partial sums).
template <typename T, typename O>
inline __attribute__((always_inline)) void backward_rows(const O* __restrict g, const T* __restrict x,
                                                         const typename Acc<T>::type* __restrict w,
                                                         const typename Acc<T>::type* __restrict rstd, T* __restrict dx,
                                                         typename Acc<T>::type* __restrict dw, int64_t d,
                                                         int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  for (int64_t n = begin; n < end; ++n) {
    const T* xr = x + n * d;
    const O* gr = g + n * d;
    const A r = rstd[n];
    A dot = 0;
    for (int64_t i = 0; i < d; ++i) dot += A(load(gr, i)) * w[i] * A(load(xr, i));
    const A c = dot * r * r / A(d);
    T* dxr = dx ? dx + n * d : nullptr;
    if (dxr)
      for (int64_t i = 0; i < d; ++i) store(dxr, i, r * (A(load(gr, i)) * w[i] - A(load(xr, i)) * c));
    if (dw)
      for (int64_t i = 0; i < d; ++i) dw[i] += A(load(gr, i)) * A(load(xr, i)) * r;
  }
}

template <typename T, typename O>
using ForwardFn = void (*)(const T*, const typename Acc<T>::type*, O*, typename Acc<T>::type*, int64_t, double,
                           int64_t, int64_t);
template <typename T, typename O>
using BackwardFn = void (*)(const O*, const T*, const typename Acc<T>::type*, const typename Acc<T>::type*, T*,
                            typename Acc<T>::type*, int64_t, int64_t, int64_t);

#if defined(__x86_64__) && defined(__GNUC__)
#define VLMKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define VLMKIT_AVX2 __attribute__((target("avx2,fma")))
template <typename T, typename O>
VLMKIT_AVX512 void forward_avx512(const T* x, const typename Acc<T>::type* w, O* y, typename Acc<T>::type* rstd,
                                  int64_t d, double eps, int64_t b, int64_t e) {
  forward_rows(x, w, y, rstd, d, eps, b, e);
}
template <typename T, typename O>
VLMKIT_AVX2 void forward_avx2(const T* x, const typename Acc<T>::type* w, O* y, typename Acc<T>::type* rstd,
                              int64_t d, double eps, int64_t b, int64_t e) {
  forward_rows(x, w, y, rstd, d, eps, b, e);
}
template <typename T, typename O>
VLMKIT_AVX512 void backward_avx512(const O* g, const T* x, const typename Acc<T>::type* w,
                                   const typename Acc<T>::type* rstd, T* dx, typename Acc<T>::type* dw, int64_t d,
                                   int64_t b, int64_t e) {
  backward_rows(g, x, w, rstd, dx, dw, d, b, e);
}
template <typename T, typename O>
VLMKIT_AVX2 void backward_avx2(const O* g, const T* x, const typename Acc<T>::type* w,
                               const typename Acc<T>::type* rstd, T* dx, typename Acc<T>::type* dw, int64_t d,
                               int64_t b, int64_t e) {
  backward_rows(g, x, w, rstd, dx, dw, d, b, e);
}
#undef VLMKIT_AVX512
#undef VLMKIT_AVX2
#define VLMKIT_ISA_CLONES 1
#endif

template <typename T, typename O>
ForwardFn<T, O> pick_forward() {
#ifdef VLMKIT_ISA_CLONES
  if constexpr (!std::is_same<T, double>::value) {
    if (cpu_isa() == 2) return &forward_avx512<T, O>;
    if (cpu_isa() == 1) return &forward_avx2<T, O>;
  }
#endif
  return &forward_rows<T, O>;
}

template <typename T, typename O>
BackwardFn<T, O> pick_backward() {
#ifdef VLMKIT_ISA_CLONES
  if constexpr (!std::is_same<T, double>::value) {
    if (cpu_isa() == 2) return &backward_avx512<T, O>;
    if (cpu_isa() == 1) return &backward_avx2<T, O>;
  }
#endif
  return &backward_rows<T, O>;
}

at::ScalarType acc_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

// Calls fn.template operator()<T, O>() for x's dtype T and an output dtype O
// of T or its accumulation type (the two the kernel writes).
template <typename Fn>
void dispatch(at::ScalarType x, at::ScalarType out, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x, "vlmkit_rms_norm", [&] {
    using A = typename Acc<scalar_t>::type;
    if (out == x) fn(scalar_t(), scalar_t());
    else fn(scalar_t(), A());
  });
}

// rows, d and row-major x (contiguous); y of dtype out, rstd [rows] of the accumulation type.
std::pair<at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                               at::ScalarType out) {
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  const auto acc = acc_dtype(x.scalar_type());
  const auto w = weight.to(acc).contiguous();
  auto y = at::empty(x.sizes(), x.options().dtype(out));
  auto rstd = at::empty({rows}, x.options().dtype(acc));
  dispatch(x.scalar_type(), out, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    using A = typename Acc<T>::type;
    const T* xp = x.data_ptr<T>();
    const A* wp = w.data_ptr<A>();
    O* yp = y.data_ptr<O>();
    A* rp = rstd.data_ptr<A>();
    const auto fn = pick_forward<T, O>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1)),
                     [&](int64_t b, int64_t e) { fn(xp, wp, yp, rp, d, eps, b, e); });
  });
  return {y, rstd};
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            double eps, int64_t out) {
    auto xc = x.contiguous();
    auto [y, rstd] = norm_forward(xc, weight, eps, static_cast<at::ScalarType>(out));
    ctx->save_for_backward({xc, weight, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused RMSNorm: a double backward (create_graph=True) is not supported; call "
                "vlmkit.set_norm_kernel(\"aten\") first");
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1], &rstd = saved[2];
    const int64_t d = x.size(-1), rows = rstd.numel();
    const auto acc = rstd.scalar_type();
    const auto w = weight.to(acc).contiguous();
    const auto g = grads[0].contiguous();
    const bool want_dx = ctx->needs_input_grad(0), want_dw = ctx->needs_input_grad(1);
    at::Tensor dx = want_dx ? at::empty_like(x) : at::Tensor();
    const int threads = at::get_num_threads();
    at::Tensor partial = want_dw ? at::zeros({threads, d}, x.options().dtype(acc)) : at::Tensor();
    dispatch(x.scalar_type(), g.scalar_type(), [&](auto t, auto o) {
      using T = decltype(t);
      using O = decltype(o);
      using A = typename Acc<T>::type;
      const O* gp = g.data_ptr<O>();
      const T* xp = x.data_ptr<T>();
      const A* wp = w.data_ptr<A>();
      const A* rp = rstd.data_ptr<A>();
      T* dxp = want_dx ? dx.data_ptr<T>() : nullptr;
      A* pp = want_dw ? partial.data_ptr<A>() : nullptr;
      const auto fn = pick_backward<T, O>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
        // Each thread sums into its own row of partials; at::parallel_for numbers
        // its threads below at::get_num_threads().
        const int tid = at::get_thread_num();
        TORCH_CHECK(tid >= 0 && tid < threads, "rms_norm: thread ", tid, " outside the ", threads,
                    " partial sums");
        fn(gp, xp, wp, rp, dxp, pp ? pp + int64_t(tid) * d : nullptr, d, b, e);
      });
    });
    at::Tensor dw = want_dw ? partial.sum(0).to(weight.scalar_type()) : at::Tensor();
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(x.defined() && weight.defined(), "rms_norm: expected defined x and weight");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: expected CPU tensors, got x on ",
                    x.device(), " and weight on ", weight.device());
  const auto s = x.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16,
                    "rms_norm: expected x of float32, float64 or bfloat16, got ", s);
  TORCH_CHECK_VALUE(weight.scalar_type() == s || weight.scalar_type() == at::kFloat,
                    "rms_norm: expected weight of x's dtype (", s, ") or float32, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
                    "rms_norm: expected x [..., D] and weight [D], got x ", x.sizes(), " and weight ",
                    weight.sizes());
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "rms_norm: eps must be a positive number, got ", eps);
  const auto promoted = at::promote_types(s, weight.scalar_type());
  const auto wanted = out_dtype.value_or(promoted);
  TORCH_CHECK_VALUE(at::isFloatingType(wanted), "rms_norm: expected a floating out_dtype, got ", wanted);
  // The kernel writes x's dtype or its accumulation type; any other dtype is a cast after.
  const auto out = wanted == s || wanted == acc_dtype(s) ? wanted : promoted;
  at::Tensor y;
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) {
    y = RmsNorm::apply(x, weight, eps, int64_t(out));
  } else {
    y = norm_forward(x.contiguous(), weight, eps, out).first;
  }
  return y.scalar_type() == wanted ? y : y.to(wanted);
}

}  // namespace kernels
}  // namespace vlmkit

// ---------------------------------------------------------------------------
// GroupNorm + GELU (kernels/norm.h).

namespace vlmkit {
namespace kernels {
namespace {

// One sample of x [S, C], channels last (positions by channels): the group
// statistics from per-channel sums over the positions (vectorised across the
// channels), folded per group (the mean first, then the variance about it), then
// y = gelu(xhat w + b) in one pass. `work` holds 4 C accumulators; stats
// [groups, 2] <- (mean, rstd) of each group.
template <typename T>
inline __attribute__((always_inline)) void gn_gelu_forward_nhwc(const T* __restrict x,
                                                                const typename Acc<T>::type* __restrict w,
                                                                const typename Acc<T>::type* __restrict b,
                                                                T* __restrict y, typename Acc<T>::type* __restrict stats,
                                                                typename Acc<T>::type* __restrict work, int64_t s,
                                                                int64_t c, int64_t groups, double eps) {
  using A = typename Acc<T>::type;
  const int64_t cg = c / groups;
  A* sum = work;            // [C]
  A* mean = work + c;       // [C]: its group's mean
  A* scale = work + 2 * c;  // [C]: rstd w
  A* shift = work + 3 * c;  // [C]: b - mean rstd w
  for (int64_t ch = 0; ch < c; ++ch) sum[ch] = 0;
  for (int64_t p = 0; p < s; ++p)
    for (int64_t ch = 0; ch < c; ++ch) sum[ch] += A(load(x, p * c + ch));
  for (int64_t g = 0; g < groups; ++g) {
    A t = 0;
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) t += sum[ch];
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) mean[ch] = t / A(cg * s);
  }
  for (int64_t ch = 0; ch < c; ++ch) sum[ch] = 0;
  for (int64_t p = 0; p < s; ++p)
    for (int64_t ch = 0; ch < c; ++ch) {
      const A d = A(load(x, p * c + ch)) - mean[ch];
      sum[ch] += d * d;
    }
  for (int64_t g = 0; g < groups; ++g) {
    A t = 0;
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) t += sum[ch];
    const A rstd = rsqrt_acc(t / A(cg * s) + A(eps));
    stats[2 * g] = mean[g * cg];
    stats[2 * g + 1] = rstd;
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
      scale[ch] = rstd * w[ch];
      shift[ch] = b[ch] - mean[ch] * scale[ch];
    }
  }
  for (int64_t p = 0; p < s; ++p)
    for (int64_t ch = 0; ch < c; ++ch) {
      const A z = A(load(x, p * c + ch)) * scale[ch] + shift[ch];
      A cdf, pdf;
      normal_parts(z, cdf, pdf);
      store(y, p * c + ch, z * cdf);
    }
}

// Its backward. With z = xhat w + b, dz = dy gelu'(z) (kept in `buf`, the
// sample's S C values); per channel db = sum dz and dw = sum dz xhat (this
// sample's row of partial sums); dx = rstd (w dz - mean(w dz) - xhat mean(w dz xhat)),
// the means over each group. `work` holds 6 C accumulators.
template <typename T>
inline __attribute__((always_inline)) void gn_gelu_backward_nhwc(
    const T* __restrict dy, const T* __restrict x, const typename Acc<T>::type* __restrict w,
    const typename Acc<T>::type* __restrict b, const typename Acc<T>::type* __restrict stats, T* __restrict dx,
    typename Acc<T>::type* __restrict dw, typename Acc<T>::type* __restrict db, typename Acc<T>::type* __restrict buf,
    typename Acc<T>::type* __restrict work, int64_t s, int64_t c, int64_t groups) {
  using A = typename Acc<T>::type;
  const int64_t cg = c / groups;
  A* mean = work;
  A* rstd = work + c;
  A* s1 = work + 2 * c;
  A* s2 = work + 3 * c;
  A* m1 = work + 4 * c;
  A* m2 = work + 5 * c;
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = stats[2 * (ch / cg)];
    rstd[ch] = stats[2 * (ch / cg) + 1];
    s1[ch] = s2[ch] = 0;
  }
  for (int64_t p = 0; p < s; ++p)
    for (int64_t ch = 0; ch < c; ++ch) {
      const A xv = load(x, p * c + ch);
      const A xhat = (xv - mean[ch]) * rstd[ch];
      const A z = xhat * w[ch] + b[ch];
      A cdf, pdf;
      normal_parts(z, cdf, pdf);
      const A d = A(load(dy, p * c + ch)) * (cdf + z * pdf);
      buf[p * c + ch] = d;
      s1[ch] += d;
      s2[ch] += d * xhat;
    }
  for (int64_t g = 0; g < groups; ++g) {
    A g1 = 0, g2 = 0;
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
      if (db) db[ch] = s1[ch];
      if (dw) dw[ch] = s2[ch];
      g1 += w[ch] * s1[ch];
      g2 += w[ch] * s2[ch];
    }
    for (int64_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
      m1[ch] = g1 / A(cg * s);
      m2[ch] = g2 / A(cg * s);
    }
  }
  if (!dx) return;
  for (int64_t p = 0; p < s; ++p)
    for (int64_t ch = 0; ch < c; ++ch) {
      const A xhat = (A(load(x, p * c + ch)) - mean[ch]) * rstd[ch];
      store(dx, p * c + ch, rstd[ch] * (w[ch] * buf[p * c + ch] - m1[ch] - xhat * m2[ch]));
    }
}

template <typename T>
using Acc_t = typename Acc<T>::type;
template <typename T>
using GnForwardFn = void (*)(const T*, const Acc_t<T>*, const Acc_t<T>*, T*, Acc_t<T>*, Acc_t<T>*, int64_t, int64_t,
                             int64_t, double);
template <typename T>
using GnBackwardFn = void (*)(const T*, const T*, const Acc_t<T>*, const Acc_t<T>*, const Acc_t<T>*, T*, Acc_t<T>*,
                              Acc_t<T>*, Acc_t<T>*, Acc_t<T>*, int64_t, int64_t, int64_t);

#if defined(__x86_64__) && defined(__GNUC__)
#define VLMKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define VLMKIT_AVX2 __attribute__((target("avx2,fma")))
template <typename T>
VLMKIT_AVX512 void gn_forward_avx512(const T* x, const Acc_t<T>* w, const Acc_t<T>* b, T* y, Acc_t<T>* st,
                                     Acc_t<T>* work, int64_t s, int64_t c, int64_t g, double eps) {
  gn_gelu_forward_nhwc(x, w, b, y, st, work, s, c, g, eps);
}
template <typename T>
VLMKIT_AVX2 void gn_forward_avx2(const T* x, const Acc_t<T>* w, const Acc_t<T>* b, T* y, Acc_t<T>* st,
                                 Acc_t<T>* work, int64_t s, int64_t c, int64_t g, double eps) {
  gn_gelu_forward_nhwc(x, w, b, y, st, work, s, c, g, eps);
}
template <typename T>
VLMKIT_AVX512 void gn_backward_avx512(const T* dy, const T* x, const Acc_t<T>* w, const Acc_t<T>* b,
                                      const Acc_t<T>* st, T* dx, Acc_t<T>* dw, Acc_t<T>* db, Acc_t<T>* buf,
                                      Acc_t<T>* work, int64_t s, int64_t c, int64_t g) {
  gn_gelu_backward_nhwc(dy, x, w, b, st, dx, dw, db, buf, work, s, c, g);
}
template <typename T>
VLMKIT_AVX2 void gn_backward_avx2(const T* dy, const T* x, const Acc_t<T>* w, const Acc_t<T>* b, const Acc_t<T>* st,
                                  T* dx, Acc_t<T>* dw, Acc_t<T>* db, Acc_t<T>* buf, Acc_t<T>* work, int64_t s,
                                  int64_t c, int64_t g) {
  gn_gelu_backward_nhwc(dy, x, w, b, st, dx, dw, db, buf, work, s, c, g);
}
#undef VLMKIT_AVX512
#undef VLMKIT_AVX2
#endif

template <typename T>
GnForwardFn<T> pick_gn_forward() {
#ifdef VLMKIT_ISA_CLONES
  if constexpr (!std::is_same<T, double>::value) {
    if (cpu_isa() == 2) return &gn_forward_avx512<T>;
    if (cpu_isa() == 1) return &gn_forward_avx2<T>;
  }
#endif
  return &gn_gelu_forward_nhwc<T>;
}

template <typename T>
GnBackwardFn<T> pick_gn_backward() {
#ifdef VLMKIT_ISA_CLONES
  if constexpr (!std::is_same<T, double>::value) {
    if (cpu_isa() == 2) return &gn_backward_avx512<T>;
    if (cpu_isa() == 1) return &gn_backward_avx2<T>;
  }
#endif
  return &gn_gelu_backward_nhwc<T>;
}

// The kernels work channels last: t [N, C, ...] as a contiguous [N, ..., C] (no
// copy for a 4-D tensor stored channels last, the conv stage's layout), and back.
at::Tensor to_channels_last(const at::Tensor& t) { return t.movedim(1, -1).contiguous(); }
at::Tensor from_channels_last(const at::Tensor& t) { return t.movedim(-1, 1); }

// Below this many elements in all, one thread does the work.
constexpr int64_t kGnParallel = 65536;

int gn_threads(const at::Tensor& x) { return x.numel() >= kGnParallel ? compute_threads() : 1; }

// The affine parameters in the accumulation type; ones and zeros when absent.
at::Tensor affine_or(const at::Tensor& p, int64_t c, at::ScalarType acc, double fill) {
  return p.defined() ? p.to(acc).contiguous() : at::full({c}, fill, at::TensorOptions().dtype(acc));
}

// xl [N, ..., C] contiguous: y (xl's dtype and shape) and stats [N, groups, 2] (mean, rstd).
std::pair<at::Tensor, at::Tensor> gn_gelu_forward(const at::Tensor& xl, int64_t groups, const at::Tensor& weight,
                                                  const at::Tensor& bias, double eps) {
  const int64_t n = xl.size(0), c = xl.size(-1), s = n * c == 0 ? 0 : xl.numel() / (n * c);
  const auto acc = acc_dtype(xl.scalar_type());
  const auto w = affine_or(weight, c, acc, 1.0), b = affine_or(bias, c, acc, 0.0);
  auto y = at::empty_like(xl);
  auto stats = at::empty({n, groups, 2}, xl.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xl.scalar_type(), "vlmkit_group_norm_gelu", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* xp = xl.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const A* wp = w.data_ptr<A>();
    const A* bp = b.data_ptr<A>();
    A* sp = stats.data_ptr<A>();
    const auto fn = pick_gn_forward<scalar_t>();
    if (s > 0)
      detail::parallel_units(n, gn_threads(xl), [&](int64_t u) {  // a sample per unit
        std::vector<A> work(static_cast<size_t>(4 * c));
        fn(xp + u * s * c, wp, bp, yp + u * s * c, sp + 2 * u * groups, work.data(), s, c, groups, eps);
      });
  });
  return {y, stats};
}

struct GroupNormGelu : public torch::autograd::Function<GroupNormGelu> {
  // Absent affine parameters travel as tensors with no elements (apply() cannot
  // take undefined tensors; C >= 1, so a parameter [C] has elements).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight_or_empty,
                            const at::Tensor& bias_or_empty, int64_t groups, double eps) {
    const at::Tensor weight = weight_or_empty.numel() > 0 ? weight_or_empty : at::Tensor();
    const at::Tensor bias = bias_or_empty.numel() > 0 ? bias_or_empty : at::Tensor();
    auto xl = to_channels_last(x);
    auto [y, stats] = gn_gelu_forward(xl, groups, weight, bias, eps);
    ctx->save_for_backward({xl, weight, bias, stats});
    ctx->saved_data["groups"] = groups;
    return from_channels_last(y);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused GroupNorm + GELU: a double backward (create_graph=True) is not supported; call "
                "vlmkit.set_norm_kernel(\"aten\") first");
    auto saved = ctx->get_saved_variables();
    const auto &xl = saved[0], &stats = saved[3];
    const at::Tensor weight = saved[1].defined() && saved[1].numel() > 0 ? saved[1] : at::Tensor();
    const at::Tensor bias = saved[2].defined() && saved[2].numel() > 0 ? saved[2] : at::Tensor();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int64_t n = xl.size(0), c = xl.size(-1), s = n * c == 0 ? 0 : xl.numel() / (n * c);
    const auto acc = stats.scalar_type();
    const auto w = affine_or(weight, c, acc, 1.0), b = affine_or(bias, c, acc, 0.0);
    const auto dy = to_channels_last(grads[0].to(xl.scalar_type()));
    const bool want_dx = ctx->needs_input_grad(0);
    const bool want_dw = weight.defined() && ctx->needs_input_grad(1);
    const bool want_db = bias.defined() && ctx->needs_input_grad(2);
    at::Tensor dx = want_dx ? at::empty_like(xl) : at::Tensor();
    // Per-sample partial sums [N, C], summed after: the same result on any number of threads.
    at::Tensor pdw = want_dw ? at::zeros({n, c}, xl.options().dtype(acc)) : at::Tensor();
    at::Tensor pdb = want_db ? at::zeros({n, c}, xl.options().dtype(acc)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xl.scalar_type(), "vlmkit_group_norm_gelu_backward", [&] {
      using A = typename Acc<scalar_t>::type;
      const scalar_t* dyp = dy.data_ptr<scalar_t>();
      const scalar_t* xp = xl.data_ptr<scalar_t>();
      const A* wp = w.data_ptr<A>();
      const A* bp = b.data_ptr<A>();
      const A* sp = stats.data_ptr<A>();
      scalar_t* dxp = want_dx ? dx.data_ptr<scalar_t>() : nullptr;
      A* dwp = want_dw ? pdw.data_ptr<A>() : nullptr;
      A* dbp = want_db ? pdb.data_ptr<A>() : nullptr;
      const auto fn = pick_gn_backward<scalar_t>();
      if (s > 0)
        detail::parallel_units(n, gn_threads(xl), [&](int64_t u) {
          std::vector<A> buf(static_cast<size_t>(s * c)), work(static_cast<size_t>(6 * c));
          const int64_t off = u * s * c;
          fn(dyp + off, xp + off, wp, bp, sp + 2 * u * groups, dxp ? dxp + off : nullptr, dwp ? dwp + u * c : nullptr,
             dbp ? dbp + u * c : nullptr, buf.data(), work.data(), s, c, groups);
        });
    });
    at::Tensor dw = want_dw ? pdw.sum(0).to(weight.scalar_type()) : at::Tensor();
    at::Tensor db = want_db ? pdb.sum(0).to(bias.scalar_type()) : at::Tensor();
    return {want_dx ? from_channels_last(dx) : at::Tensor(), dw, db, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor group_norm_gelu(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                           double eps) {
  TORCH_CHECK_VALUE(x.defined(), "group_norm_gelu: expected a defined x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "group_norm_gelu: expected x [N, C, ...], got ", x.sizes());
  const auto s = x.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16,
                    "group_norm_gelu: expected x of float32, float64 or bfloat16, got ", s);
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && c >= 1 && c % groups == 0, "group_norm_gelu: expected groups >= 1 dividing the ", c,
                    " channels, got ", groups);
  for (const auto* p : {&weight, &bias}) {
    const char* which = p == &weight ? "weight" : "bias";
    if (!p->defined()) continue;
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == c, "group_norm_gelu: expected ", which, " [", c, "], got ",
                      p->sizes());
    TORCH_CHECK_VALUE(p->scalar_type() == s || p->scalar_type() == at::kFloat, "group_norm_gelu: expected ", which,
                      " of x's dtype (", s, ") or float32, got ", p->scalar_type());
  }
  TORCH_CHECK_VALUE(x.device().is_cpu() && (!weight.defined() || weight.device().is_cpu()) &&
                        (!bias.defined() || bias.device().is_cpu()),
                    "group_norm_gelu: expected CPU tensors, got x on ", x.device());
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "group_norm_gelu: eps must be a positive number, got ", eps);
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || (weight.defined() && weight.requires_grad()) ||
                                                   (bias.defined() && bias.requires_grad()));
  if (grad) {
    const auto empty = at::empty({0}, x.options());
    return GroupNormGelu::apply(x, weight.defined() ? weight : empty, bias.defined() ? bias : empty, groups, eps);
  }
  return from_channels_last(gn_gelu_forward(to_channels_last(x), groups, weight, bias, eps).first);
}

}  // namespace kernels
}  // namespace vlmkit
