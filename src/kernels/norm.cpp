// Fused RMSNorm (kernels/norm.h).
#include "vlmkit/kernels/norm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#include "switch.h"
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
