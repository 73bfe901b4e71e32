// Fused GELU MLP (kernels/mlp.h).
#include "vlmkit/kernels/mlp.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/BFloat16.h>
#include <torch/autograd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include <ATen/Parallel.h>
#include "gemm_detail.h"
#include "switch.h"
#include "vec_math.h"

namespace vlmkit {
namespace {
kernels::KernelSwitch g_mlp_kernel("set_mlp_kernel");
}  // namespace

void set_mlp_kernel(const std::string& kernel) { g_mlp_kernel.set(kernel); }

std::string mlp_kernel() { return g_mlp_kernel.get(); }

namespace kernels {
namespace {

constexpr int64_t kGrain = 32768;  // elements below which one thread does the work

template <typename T>
inline __attribute__((always_inline)) void gelu_range(const T* __restrict h, T* __restrict g, int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  for (int64_t i = begin; i < end; ++i) {
    const A x = load(h, i);
    A cdf, pdf;
    normal_parts(x, cdf, pdf);
    store(g, i, x * cdf);
  }
}

// g = gelu(h), and in place grad -> grad * gelu'(h), gelu'(x) = Phi(x) + x phi(x).
template <typename T>
inline __attribute__((always_inline)) void gelu_backward_range(T* __restrict grad, const T* __restrict h, T* __restrict g, int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  for (int64_t i = begin; i < end; ++i) {
    const A x = load(h, i);
    const A gy = load(grad, i);
    A cdf, pdf;
    normal_parts(x, cdf, pdf);
    store(g, i, x * cdf);
    store(grad, i, gy * (cdf + x * pdf));
  }
}

// Vector clones of the two loops (float32 and bfloat16; float64 is the
// gradcheck path), picked at run time as the attention kernel's are.
template <typename T>
using GeluFn = void (*)(const T*, T*, int64_t, int64_t);
template <typename T>
using GeluBackwardFn = void (*)(T*, const T*, T*, int64_t, int64_t);
#if defined(__x86_64__) && defined(__GNUC__)
#define VLMKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define VLMKIT_AVX2 __attribute__((target("avx2,fma")))
template <typename T>
VLMKIT_AVX512 void gelu_avx512(const T* h, T* g, int64_t b, int64_t e) {
  gelu_range(h, g, b, e);
}
template <typename T>
VLMKIT_AVX2 void gelu_avx2(const T* h, T* g, int64_t b, int64_t e) {
  gelu_range(h, g, b, e);
}
template <typename T>
VLMKIT_AVX512 void gelu_backward_avx512(T* grad, const T* h, T* g, int64_t b, int64_t e) {
  gelu_backward_range(grad, h, g, b, e);
}
template <typename T>
VLMKIT_AVX2 void gelu_backward_avx2(T* grad, const T* h, T* g, int64_t b, int64_t e) {
  gelu_backward_range(grad, h, g, b, e);
}
#undef VLMKIT_AVX512
#undef VLMKIT_AVX2
#define VLMKIT_ISA_CLONES 1
#endif

template <typename T>
GeluFn<T> pick_gelu() {
#ifdef VLMKIT_ISA_CLONES
  if constexpr (!std::is_same<T, double>::value) {
    if (cpu_isa() == 2) return &gelu_avx512<T>;
    if (cpu_isa() == 1) return &gelu_avx2<T>;
  }
#endif
  return &gelu_range<T>;
}

template <typename T>
GeluBackwardFn<T> pick_gelu_backward() {
#ifdef VLMKIT_ISA_CLONES
  if constexpr (!std::is_same<T, double>::value) {
    if (cpu_isa() == 2) return &gelu_backward_avx512<T>;
    if (cpu_isa() == 1) return &gelu_backward_avx2<T>;
  }
#endif
  return &gelu_backward_range<T>;
}

// On torch's intra-op threads (at::parallel_for), not an OpenMP team of the
// kernel's own: under the fp32 thread policy torch has one thread and BLAS the
// cores, and a second team spinning between regions takes the cores from
// BLAS's threads (measured: the fp32 training step 18% slower at batch 32,
// 2.5x at batch 1).
template <typename Fn>
void for_chunks(int64_t n, const Fn& fn) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

void check_elementwise(const at::Tensor& t, const char* who) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), who, ": expected a CPU tensor, got one on ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16, who,
                    ": expected float32, float64 or bfloat16, got ", s);
}

// The dtype the MLP computes in: the autocast dtype under CPU autocast (as
// ATen's Linear would), else x's.
at::ScalarType compute_dtype(const at::Tensor& x) {
  if (at::autocast::is_cpu_enabled() && at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kDouble)
    return at::autocast::get_autocast_cpu_dtype();
  return x.scalar_type();
}

at::Tensor cast(const at::Tensor& t, at::ScalarType s) {
  return !t.defined() || t.scalar_type() == s ? t : t.to(s);
}

at::Tensor linear2d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return gemm(x, false, w, true, b);
}

at::Tensor gelu_forward(const at::Tensor& h_in) {
  const auto h = h_in.contiguous();
  auto g = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "vlmkit_gelu_forward", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    const auto fn = pick_gelu<scalar_t>();
    for_chunks(h.numel(), [&](int64_t b, int64_t e) { fn(hp, gp, b, e); });
  });
  return g;
}

// The forward both paths run: in the compute dtype, autocast's own casts
// excluded; out has x's leading shape.
struct MlpForward {
  at::Tensor x2, w1c, w2c, h, out;
};
MlpForward mlp_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                       const at::Tensor& b2) {
  const auto ct = compute_dtype(x);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  MlpForward f;
  f.x2 = as_matrix(cast(x, ct));
  f.w1c = cast(w1, ct);
  f.w2c = cast(w2, ct);
  f.h = linear2d(f.x2, f.w1c, cast(b1, ct));
  auto sizes = x.sizes().vec();
  sizes.back() = w2.size(0);
  f.out = linear2d(gelu_forward(f.h), f.w2c, cast(b2, ct)).view(sizes);
  return f;
}

struct FusedGeluMlp : public torch::autograd::Function<FusedGeluMlp> {
  // Undefined biases travel as tensors with no elements (apply() cannot take
  // undefined tensors).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& b1_or_empty, const at::Tensor& w2, const at::Tensor& b2_or_empty) {
    const at::Tensor b1 = b1_or_empty.numel() > 0 ? b1_or_empty : at::Tensor();
    const at::Tensor b2 = b2_or_empty.numel() > 0 ? b2_or_empty : at::Tensor();
    auto f = mlp_forward(x, w1, b1, w2, b2);
    ctx->save_for_backward({f.x2, f.h, f.w1c, f.w2c});
    ctx->saved_data["x_sizes"] = x.sizes();
    ctx->saved_data["x_dtype"] = int64_t(x.scalar_type());
    ctx->saved_data["w_dtype"] = int64_t(w1.scalar_type());
    ctx->saved_data["b1"] = b1.defined();
    ctx->saved_data["b2"] = b2.defined();
    return f.out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused GELU MLP: a double backward (create_graph=True) is not supported; call "
                "vlmkit.set_mlp_kernel(\"aten\") first");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
    auto saved = ctx->get_saved_variables();
    const auto &x2 = saved[0], &h = saved[1], &w1c = saved[2], &w2c = saved[3];
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const auto w_dtype = static_cast<at::ScalarType>(ctx->saved_data["w_dtype"].toInt());
    const auto go = as_matrix(cast(grads[0], h.scalar_type()));
    // grad_g = go w2, then in one pass g = gelu(h) and grad_h (over grad_g's buffer).
    auto grad_h = gemm(go, false, w2c, false);
    auto g = at::empty_like(h);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "fused_gelu_mlp_backward", [&] {
      scalar_t* gd = grad_h.data_ptr<scalar_t>();
      const scalar_t* hp = h.data_ptr<scalar_t>();
      scalar_t* outg = g.data_ptr<scalar_t>();
      const auto fn = pick_gelu_backward<scalar_t>();
      for_chunks(h.numel(), [&](int64_t b, int64_t e) { fn(gd, hp, outg, b, e); });
    });
    at::Tensor dx, dw1, db1, dw2, db2;
    // Under autocast the GEMMs write float32 gradients (float32 inputs and master
    // weights) straight from their float32 accumulators, with no bf16 rounding.
    auto wide = [&](at::ScalarType t) { return t == at::kFloat ? t : at::ScalarType::Undefined; };
    auto column_sum = [&](const at::Tensor& t) {
      return at::sum(t, {0}, false, t.scalar_type() == at::kBFloat16 ? at::kFloat : t.scalar_type());
    };
    if (ctx->needs_input_grad(0))
      dx = cast(gemm(grad_h, false, w1c, false, {}, wide(x_dtype)), x_dtype).view(ctx->saved_data["x_sizes"].toIntVector());
    if (ctx->needs_input_grad(1)) dw1 = cast(gemm(grad_h, true, x2, false, {}, wide(w_dtype)), w_dtype);
    if (ctx->needs_input_grad(2) && ctx->saved_data["b1"].toBool()) db1 = cast(column_sum(grad_h), w_dtype);
    if (ctx->needs_input_grad(3)) dw2 = cast(gemm(go, true, g, false, {}, wide(w_dtype)), w_dtype);
    if (ctx->needs_input_grad(4) && ctx->saved_data["b2"].toBool()) db2 = cast(column_sum(go), w_dtype);
    return {dx, dw1, db1, dw2, db2};
  }
};

}  // namespace

at::Tensor fused_gelu_mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2) {
  check_elementwise(x, "fused_gelu_mlp");
  TORCH_CHECK_VALUE(x.dim() >= 1 && w1.dim() == 2 && w2.dim() == 2 && w1.size(1) == x.size(-1) &&
                        w2.size(1) == w1.size(0),
                    "fused_gelu_mlp: expected x [..., in], w1 [hidden, in], w2 [out, hidden], got x ", x.sizes(),
                    ", w1 ", w1.sizes(), ", w2 ", w2.sizes());
  TORCH_CHECK_VALUE((!b1.defined() || b1.sizes() == at::IntArrayRef{w1.size(0)}) &&
                        (!b2.defined() || b2.sizes() == at::IntArrayRef{w2.size(0)}),
                    "fused_gelu_mlp: expected biases [hidden] and [out]");
  const bool autocast = compute_dtype(x) != x.scalar_type();
  for (const auto* t : {&w1, &b1, &w2, &b2}) {
    if (!t->defined()) continue;
    TORCH_CHECK_VALUE(t->device().is_cpu(), "fused_gelu_mlp: expected CPU weights, got one on ", t->device());
    TORCH_CHECK_VALUE(autocast ? at::isFloatingType(t->scalar_type()) : t->scalar_type() == x.scalar_type(),
                      "fused_gelu_mlp: expected weights of x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  }
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w1.requires_grad() || w2.requires_grad() ||
                     (b1.defined() && b1.requires_grad()) || (b2.defined() && b2.requires_grad()));
  if (!grad) return mlp_forward(x, w1, b1, w2, b2).out;  // inference: nothing to keep for a backward
  const auto empty = at::empty({0}, x.options());
  return FusedGeluMlp::apply(x, w1, b1.defined() ? b1 : empty, w2, b2.defined() ? b2 : empty);
}

}  // namespace kernels
}  // namespace vlmkit
