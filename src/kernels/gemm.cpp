// Float32 GEMMs through oneDNN: the Linear and the batched matmul built on them (kernels/gemm.h).
#include "vlmkit/kernels/gemm.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../internal.h"
#include "gemm_detail.h"
#include "switch.h"
#include "vlmkit/runtime.h"

namespace vlmkit {
namespace {
kernels::KernelSwitch g_gemm_kernel("set_gemm_kernel");
}  // namespace

void set_gemm_kernel(const std::string& kernel) { g_gemm_kernel.set(kernel); }

std::string gemm_kernel() { return g_gemm_kernel.get(); }

namespace kernels {

#ifdef VLMKIT_WITH_DNNL
// oneDNN's BLAS-like entry point (dnnl.h; declared here so that only the library,
// which LibTorch loads anyway, is needed, not its headers). Row-major:
// C = alpha op(A) op(B) + beta C; returns dnnl_success (0) or an error status.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// The same with bfloat16 A and B (dnnl_bfloat16_t: the 16 bits) and float32
// accumulation and C.
extern "C" int dnnl_gemm_bf16bf16f32(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                                     const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta,
                                     float* C, int64_t ldc);
#endif

bool have_dnnl_sgemm() {
#ifdef VLMKIT_WITH_DNNL
  return true;
#else
  return false;
#endif
}

#ifdef VLMKIT_WITH_DNNL
namespace {
// Products below this many multiply-adds (about 40 us of one core's work) run on
// the calling thread alone, where the pool's wake-up would be a visible share of
// the product. It keeps every GEMM of the small VLM at batch 1 (0.5-4 M
// multiply-adds) on one thread. The small VLM's fp32 step, vlmkit alone, with
// the split from 8 M / 2 M / 0.5 M: batch 1 19.3 / 20.3 / 22.0 ms; from 8 M / 32 M
// / 2 M: batch 32 156 / 165 / 157 ms (docs/benchmarks.md, "fp32 GEMMs: every
// Linear and attention's products in oneDNN"). A batched product splits from 1 M
// in all.
constexpr double kSplitMacs = 8.0 * (1 << 20);

// Sets this thread's OpenMP team size for its lifetime (oneDNN reads it per call).
class OmpThreads {
 public:
  explicit OmpThreads(int n) {
#ifdef _OPENMP
    before_ = omp_get_max_threads();
    if (before_ != n) omp_set_num_threads(n);
    else before_ = 0;
#else
    (void)n;
#endif
  }
  ~OmpThreads() {
#ifdef _OPENMP
    if (before_ > 0) omp_set_num_threads(before_);
#endif
  }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int before_ = 0;
};

int omp_team() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// C = op(A) op(B) (+ C where accumulate), row-major, on compute_threads() threads:
// call(m0, m1, n0, n1) computes the block of C's rows [m0, m1) and columns [n0, n1).
// oneDNN threads with OpenMP. Under the float32 policy OpenMP has torch's one
// thread and BLAS the cores, and an OpenMP team of two spins after every region
// on the core that OpenBLAS's and run_parallel's threads then need (the small
// VLM's fp32 step at batch 1 ran 0.27x the peer with the MLP's GEMMs on a team
// of two). So where OpenMP has fewer threads than vlmkit's policy gives, the
// product is cut in blocks of C's rows (or columns, whichever is longer) and
// each block is one single-threaded GEMM on a run_parallel unit, whose
// threads sleep between calls. Under the bf16 policy OpenMP has the threads and
// oneDNN's own team runs the whole product.
template <typename Call>
void gemm_blocks(int64_t m, int64_t n, int64_t k, const Call& call) {
  const int threads = compute_threads();
  const int team = omp_team();
  if (threads <= team || double(m) * double(n) * double(k) < kSplitMacs) return call(0, m, 0, n);
  // Blocks of whole 16-float vectors along the longer side.
  const bool by_rows = m >= n;
  const int64_t len = by_rows ? m : n;
  const int64_t units = std::min<int64_t>(threads, std::max<int64_t>(1, len / 16));
  const int64_t step = ((len + units - 1) / units + 15) / 16 * 16;
  run_parallel(units, threads, [&](int64_t u) {
    const int64_t lo = std::min(len, u * step), hi = std::min(len, lo + step);
    if (lo >= hi) return;
    OmpThreads one(1);
    if (by_rows) call(lo, hi, 0, n);
    else call(0, m, lo, hi);
  });
}

// One GEMM through dnnl_sgemm (T = float) or dnnl_gemm_bf16bf16f32 (T = BFloat16).
template <typename T>
void dnnl_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
               int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  gemm_blocks(m, n, k, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    const T* ab = ta ? a + m0 : a + m0 * lda;
    const T* bb = tb ? b + n0 * ldb : b + n0;
    const float beta = accumulate ? 1.0f : 0.0f;
    int status;
    if constexpr (std::is_same<T, float>::value) {
      status = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m1 - m0, n1 - n0, k, 1.0f, ab, lda, bb, ldb, beta,
                          c + m0 * ldc + n0, ldc);
    } else {
      status = dnnl_gemm_bf16bf16f32(ta ? 'T' : 'N', tb ? 'T' : 'N', m1 - m0, n1 - n0, k, 1.0f,
                                     reinterpret_cast<const uint16_t*>(ab), lda,
                                     reinterpret_cast<const uint16_t*>(bb), ldb, beta, c + m0 * ldc + n0, ldc);
    }
    TORCH_CHECK(status == 0, "gemm: oneDNN's GEMM failed with status ", status);
  });
}
}  // namespace
#endif

at::Tensor gemm(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, const at::Tensor& bias,
                at::ScalarType out) {
  const auto s = a.scalar_type();
  if (out == at::ScalarType::Undefined) out = s;
#ifdef VLMKIT_WITH_DNNL
  const bool dnnl = (s == at::kFloat || s == at::kBFloat16) && b.scalar_type() == s && a.device().is_cpu() &&
                    b.device().is_cpu() && (out == s || out == at::kFloat) &&
                    (!bias.defined() || bias.scalar_type() == s || bias.scalar_type() == at::kFloat);
  if (dnnl) {
    const auto ac = a.contiguous(), bc = b.contiguous();
    const int64_t m = ta ? ac.size(1) : ac.size(0), k = ta ? ac.size(0) : ac.size(1);
    const int64_t n = tb ? bc.size(0) : bc.size(1);
    TORCH_CHECK((tb ? bc.size(1) : bc.size(0)) == k, "gemm: inner sizes differ: ", ac.sizes(), " and ", bc.sizes());
    // C (float32) starts as the bias in every row (a copy: for one row the expanded
    // bias is itself contiguous, and the product must not land in it). beta = 0
    // need not clear C, so a product over zero inner size is written as zeros.
    const auto f32 = ac.options().dtype(at::kFloat);
    at::Tensor c = k == 0 && !bias.defined() ? at::zeros({m, n}, f32) : at::empty({m, n}, f32);
    if (bias.defined()) c.copy_(bias.reshape({1, n}).expand({m, n}));
    if (m > 0 && n > 0 && k > 0) {
      if (s == at::kFloat)
        dnnl_gemm(ta, tb, m, n, k, ac.data_ptr<float>(), ac.size(1), bc.data_ptr<float>(), bc.size(1),
                  bias.defined(), c.data_ptr<float>(), n);
      else
        dnnl_gemm(ta, tb, m, n, k, ac.data_ptr<c10::BFloat16>(), ac.size(1), bc.data_ptr<c10::BFloat16>(),
                  bc.size(1), bias.defined(), c.data_ptr<float>(), n);
    }
    return out == at::kFloat ? c : c.to(out);
  }
#endif
  const auto ao = ta ? a.t() : a, bo = tb ? b.t() : b;
  auto c = bias.defined() ? at::addmm(bias.to(s), ao, bo) : at::mm(ao, bo);
  return c.scalar_type() == out ? c : c.to(out);
}

namespace {

// Which path kernels::linear takes.
enum class LinearPath { aten, f32, bf16 };

LinearPath linear_path(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (!have_dnnl_sgemm() || !g_gemm_kernel.is_auto()) return LinearPath::aten;
  if (!x.device().is_cpu() || !w.device().is_cpu() || x.dim() < 1 || w.dim() != 2 || x.size(-1) != w.size(1) ||
      (b.defined() && (!b.device().is_cpu() || b.dim() != 1 || b.size(0) != w.size(0))))
    return LinearPath::aten;
  auto either = [](const at::Tensor& t) {
    return !t.defined() || t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  if (at::autocast::is_cpu_enabled()) {
    // Under CPU autocast at::linear computes in the autocast dtype: bfloat16 here too
    // (any other autocast dtype is left to ATen).
    return at::autocast::get_autocast_cpu_dtype() == at::kBFloat16 && either(x) && either(w) && either(b)
               ? LinearPath::bf16
               : LinearPath::aten;
  }
  const bool f32 = x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                   (!b.defined() || b.scalar_type() == at::kFloat);
  return f32 ? LinearPath::f32 : LinearPath::aten;
}

// x w^T + b through gemm(), in x's leading shape: the forward with and without autograd.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return gemm(as_matrix(x), false, w, true, b).view(sizes);
}

struct DnnlLinear : public torch::autograd::Function<DnnlLinear> {
  // Without a bias, `bias` is a placeholder tensor and has_bias false (apply()
  // cannot take undefined tensors; a bias of no elements, for no outputs, is a bias).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& bias, bool has_bias) {
    // x itself, not a [rows, in] view of it: under create_graph only saved inputs
    // stay linked to their graph.
    ctx->save_for_backward({x, w});
    ctx->saved_data["b"] = has_bias;
    return linear_forward(x, w, has_bias ? bias : at::Tensor());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1];
    const auto x2 = as_matrix(x);
    const auto go = as_matrix(grads[0]);
    // Under create_graph the gradients must themselves be differentiable: ATen's ops.
    const bool differentiable = at::GradMode::is_enabled();
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0))
      dx = (differentiable ? at::mm(go, w) : gemm(go, false, w, false)).view(x.sizes());
    if (ctx->needs_input_grad(1)) dw = differentiable ? at::mm(go.t(), x2) : gemm(go, true, x2, false);
    if (ctx->needs_input_grad(2) && ctx->saved_data["b"].toBool()) db = go.sum(0);
    return {dx, dw, db, at::Tensor()};
  }
};

// Under bf16 autocast: x w^T + b with x and w rounded to bfloat16 (as autocast's
// casts do), float32 accumulation and bias, one rounding of the result to
// bfloat16 (autocast's dtype for a Linear).
at::Tensor bf16_linear_forward(const at::Tensor& xb, const at::Tensor& wb, const at::Tensor& b,
                               at::IntArrayRef x_sizes) {
  auto sizes = x_sizes.vec();
  sizes.back() = wb.size(0);
  return gemm(xb, false, wb, true, b, at::kBFloat16).view(sizes);
}

at::Tensor to_bf16(const at::Tensor& t) {
  return (t.scalar_type() == at::kBFloat16 ? t : t.to(at::kBFloat16)).contiguous();
}

// The autocast Linear's autograd: keeps x and w in bfloat16 (what autocast's
// at::linear keeps), and writes the gradients of x, w and b from float32
// accumulators straight in their own dtypes (float32 master weights: no
// bfloat16 rounding of the weight gradient, and no cast after).
struct Bf16Linear : public torch::autograd::Function<Bf16Linear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& bias, bool has_bias) {
    const auto xb = to_bf16(as_matrix(x)), wb = to_bf16(w);
    ctx->save_for_backward({xb, wb});
    ctx->saved_data["x_sizes"] = x.sizes();
    ctx->saved_data["x_dtype"] = int64_t(x.scalar_type());
    ctx->saved_data["w_dtype"] = int64_t(w.scalar_type());
    ctx->saved_data["b_dtype"] = int64_t(has_bias ? bias.scalar_type() : at::kFloat);
    ctx->saved_data["b"] = has_bias;
    return bf16_linear_forward(xb, wb, has_bias ? bias : at::Tensor(), x.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "Linear under bf16 autocast: a double backward (create_graph=True) is not supported by vlmkit's "
                "oneDNN GEMMs; call vlmkit.set_gemm_kernel(\"aten\") first");
    auto saved = ctx->get_saved_variables();
    const auto &xb = saved[0], &wb = saved[1];
    auto dtype = [&](const char* key) { return static_cast<at::ScalarType>(ctx->saved_data[key].toInt()); };
    const auto go = to_bf16(as_matrix(grads[0]));
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0))
      dx = gemm(go, false, wb, false, {}, at::kFloat).to(dtype("x_dtype")).view(ctx->saved_data["x_sizes"].toIntVector());
    if (ctx->needs_input_grad(1)) dw = gemm(go, true, xb, false, {}, at::kFloat).to(dtype("w_dtype"));
    if (ctx->needs_input_grad(2) && ctx->saved_data["b"].toBool())
      db = at::sum(go, {0}, false, at::kFloat).to(dtype("b_dtype"));
    return {dx, dw, db, at::Tensor()};
  }
};

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const auto path = linear_path(x, w, b);
  if (path == LinearPath::aten) return at::linear(x, w, b);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || (b.defined() && b.requires_grad()));
  // Inference keeps nothing for a backward; with autograd an absent bias travels
  // as a tensor of no elements (apply() cannot take undefined tensors).
  if (path == LinearPath::bf16) {
    if (!grad) return bf16_linear_forward(to_bf16(as_matrix(x)), to_bf16(w), b, x.sizes());
    return Bf16Linear::apply(x, w, b.defined() ? b : at::empty({0}, x.options()), b.defined());
  }
  if (!grad) return linear_forward(x, w, b);
  return DnnlLinear::apply(x, w, b.defined() ? b : at::empty({0}, x.options()), b.defined());
}

#ifdef VLMKIT_WITH_DNNL
namespace {

// A batch of matrices X [..., R, C] as oneDNN reads them: row-major with leading
// dimension ld, or (trans) the transpose of a row-major [C, R] one, at base +
// offsets[u] for batch entry u. Views from transpose / view (attention's q, k and
// v heads) qualify as they are; other layouts are copied first.
struct Batch {
  at::Tensor t;
  bool trans = false;
  int64_t ld = 0;
  std::vector<int64_t> offsets;
};

Batch batch_of(const at::Tensor& x_in) {
  const int64_t r = x_in.size(-2), c = x_in.size(-1);
  auto layout_ok = [&](const at::Tensor& x) {
    return (x.stride(-1) == 1 && (r <= 1 || x.stride(-2) >= c)) || (x.stride(-2) == 1 && (c <= 1 || x.stride(-1) >= r));
  };
  Batch b;
  b.t = layout_ok(x_in) ? x_in : x_in.contiguous();
  const auto& x = b.t;
  b.trans = !(x.stride(-1) == 1 && (r <= 1 || x.stride(-2) >= c));
  b.ld = b.trans ? std::max<int64_t>({x.stride(-1), r, 1}) : std::max<int64_t>({x.stride(-2), c, 1});
  int64_t count = 1;
  for (int64_t d = 0; d + 2 < x.dim(); ++d) count *= x.size(d);
  b.offsets.resize(count);
  for (int64_t u = 0; u < count; ++u) {
    int64_t rest = u, off = 0;
    for (int64_t d = x.dim() - 3; d >= 0; --d) {
      off += (rest % x.size(d)) * x.stride(d);
      rest /= x.size(d);
    }
    b.offsets[u] = off;
  }
  return b;
}

// a [..., M, K] b [..., K, N] -> [..., M, N] (contiguous), one single-threaded
// sgemm per batch entry, the entries handed out on compute_threads() threads.
at::Tensor batched_gemm(const at::Tensor& a_in, const at::Tensor& b_in) {
  const int64_t m = a_in.size(-2), k = a_in.size(-1), n = b_in.size(-1);
  auto sizes = a_in.sizes().vec();
  sizes.back() = n;
  auto c = at::empty(sizes, a_in.options());
  if (c.numel() == 0) return c;
  if (k == 0) return c.zero_();
  const Batch a = batch_of(a_in), b = batch_of(b_in);
  const int64_t count = static_cast<int64_t>(a.offsets.size());
  const float* pa = a.t.data_ptr<float>();
  const float* pb = b.t.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  auto unit = [&](int64_t u) {
    const int status = dnnl_sgemm(a.trans ? 'T' : 'N', b.trans ? 'T' : 'N', m, n, k, 1.0f, pa + a.offsets[u], a.ld,
                                  pb + b.offsets[u], b.ld, 0.0f, pc + u * m * n, n);
    TORCH_CHECK(status == 0, "matmul: dnnl_sgemm failed with status ", status);
  };
  const bool split = count > 1 && double(count) * m * n * k >= kSplitMacs / 8;
  detail::parallel_units(count, split ? compute_threads() : 1, [&](int64_t u) {
    OmpThreads one(1);  // a pool thread's own team (OpenMP's threads run one sgemm each anyway)
    unit(u);
  });
  return c;
}

bool use_dnnl_matmul(const at::Tensor& a, const at::Tensor& b) {
  if (!have_dnnl_sgemm() || !g_gemm_kernel.is_auto() || at::autocast::is_cpu_enabled()) return false;
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || !a.device().is_cpu() ||
      !b.device().is_cpu() || a.dim() < 3 || a.dim() != b.dim() || a.size(-1) != b.size(-2))
    return false;
  for (int64_t d = 0; d + 2 < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

struct DnnlMatmul : public torch::autograd::Function<DnnlMatmul> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    ctx->save_for_backward({a, b});
    return batched_gemm(a, b);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &a = saved[0], &b = saved[1];
    const auto& gc = grads[0];
    const bool differentiable = at::GradMode::is_enabled();  // create_graph: ATen's differentiable ops
    auto mm = [&](const at::Tensor& x, const at::Tensor& y) {
      return differentiable ? at::matmul(x, y) : batched_gemm(x, y);
    };
    at::Tensor da, db;
    if (ctx->needs_input_grad(0)) da = mm(gc, b.transpose(-2, -1));
    if (ctx->needs_input_grad(1)) db = mm(a.transpose(-2, -1), gc);
    return {da, db};
  }
};

}  // namespace
#endif

at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) {
#ifdef VLMKIT_WITH_DNNL
  if (use_dnnl_matmul(a, b)) {
    if (!(at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad()))) return batched_gemm(a, b);
    return DnnlMatmul::apply(a, b);
  }
#endif
  return at::matmul(a, b);
}

}  // namespace kernels

namespace detail {
void parallel_units(int64_t units, int threads, const std::function<void(int64_t)>& fn) {
  if (units <= 0) return;
#ifdef _OPENMP
  const bool nested = omp_in_parallel();
  const int team = nested ? 1 : omp_get_max_threads();
#else
  const bool nested = false;
  const int team = 1;
#endif
  if (threads <= 1 || units == 1 || nested) {
    for (int64_t u = 0; u < units; ++u) fn(u);
  } else if (threads <= team) {
    at::parallel_for(0, units, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) fn(u);
    });
  } else {
    run_parallel(units, threads, fn);
  }
}
}  // namespace detail
}  // namespace vlmkit
