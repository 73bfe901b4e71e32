// Fused CPU attention (kernels/attention.h).
#include "vlmkit/kernels/attention.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/autograd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "vlmkit/runtime.h"
#include "vec_math.h"

namespace vlmkit {
namespace {
std::atomic<int> g_kernel{0};  // 0 auto, 1 fused, 2 aten
}  // namespace

void set_attention_kernel(const std::string& kernel) {
  if (kernel == "auto") g_kernel = 0;
  else if (kernel == "fused") g_kernel = 1;
  else if (kernel == "aten") g_kernel = 2;
  else
    TORCH_CHECK_VALUE(false, "set_attention_kernel: expected \"auto\", \"fused\" or \"aten\", got \"", kernel, "\"");
}

std::string attention_kernel() {
  const int k = g_kernel.load();
  return k == 0 ? "auto" : k == 1 ? "fused" : "aten";
}

namespace kernels {
namespace {

constexpr int64_t kTile = 64;  // keys per tile
constexpr int64_t kRows = 16;  // query rows per tile of the skip map
// Bias entries at or below this block their key: exp(bias + score - max) is
// exactly 0 in float32 for any score a finite model produces.
constexpr double kBlocked = -1e30;

inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

// Strided [B, H, L, D] view with unit stride in D.
template <typename T>
struct View4 {
  const T* data;
  int64_t sb, sh, sl;
  const T* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};
template <typename T>
View4<T> view4(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

struct Shape {
  int64_t b, h, t, s, d, nk, nq, bias_b;  // bias_b: 0 without bias, else 1 or B
};

int threads_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(compute_threads(), work)));
}

// skip[(bb * nq + qt) * nk + kt] = 1 when the bias blocks every (query, key)
// of the tile and no query row of the tile has every key blocked (such a row
// takes uniform weights over all keys, so none of its tiles may be skipped).
template <typename A>
at::Tensor skip_map(const A* bias, const Shape& g) {
  auto skip = at::zeros({std::max<int64_t>(g.bias_b, 1), g.nq, g.nk}, at::kByte);
  if (!bias) return skip;
  uint8_t* out = skip.data_ptr<uint8_t>();
  const int64_t units = g.bias_b * g.nq;
  run_parallel(units, threads_for(units), [&](int64_t u) {
    const int64_t bb = u / g.nq, qt = u % g.nq;
    std::vector<uint8_t> all(size_t(g.nk), 1);
    bool dead = false;
    for (int64_t r = qt * kRows; r < std::min(g.t, (qt + 1) * kRows); ++r) {
      const A* row = bias + (bb * g.t + r) * g.s;
      bool open = false;
      for (int64_t kt = 0; kt < g.nk; ++kt) {
        const int64_t c0 = kt * kTile, c1 = std::min(g.s, c0 + kTile);
        bool blocked = true;
        for (int64_t c = c0; c < c1; ++c) blocked &= row[c] <= A(kBlocked);
        all[size_t(kt)] &= uint8_t(blocked);
        open |= !blocked;
      }
      dead |= !open;
    }
    for (int64_t kt = 0; kt < g.nk; ++kt) out[u * g.nk + kt] = uint8_t(all[size_t(kt)] && !dead);
  });
  return skip;
}

// Keys of one (b, h) as acc-type buffers padded to whole tiles: transposed
// [D][nk * kTile] (for q k^T) and row-major [nk * kTile][D] (for weights x v).
template <typename T, typename A>
void load_keys(const View4<T>& x, int64_t b, int64_t h, const Shape& g, A* transposed, A* rows) {
  const int64_t sp = g.nk * kTile;
  if (transposed) std::fill(transposed, transposed + g.d * sp, A(0));
  if (rows) std::fill(rows + g.s * g.d, rows + sp * g.d, A(0));
  for (int64_t j = 0; j < g.s; ++j) {
    const T* src = x.row(b, h, j);
    for (int64_t e = 0; e < g.d; ++e) {
      const A value = static_cast<A>(src[e]);
      if (transposed) transposed[e * sp + j] = value;
      if (rows) rows[j * g.d + e] = value;
    }
  }
}

// s[c] = q . k_c + bias_c over one key tile (c >= cn: -inf).
template <typename A>
inline __attribute__((always_inline)) void tile_scores(const A* __restrict q, const A* __restrict kt, int64_t sp,
                                                       int64_t d, const A* __restrict bias, int64_t cn,
                                                       A* __restrict s) {
  for (int64_t c = 0; c < kTile; ++c) s[c] = A(0);
  for (int64_t e = 0; e < d; ++e) {
    const A qe = q[e];
    const A* __restrict kr = kt + e * sp;
    for (int64_t c = 0; c < kTile; ++c) s[c] += qe * kr[c];
  }
  if (bias)
    for (int64_t c = 0; c < cn; ++c) s[c] += bias[c];
  for (int64_t c = cn; c < kTile; ++c) s[c] = -std::numeric_limits<A>::infinity();
}

// Max and sum over one tile through kLanes partial results (a reduction
// in the loop's order would not vectorise without -ffast-math).
constexpr int64_t kLanes = 16;
template <typename A>
inline __attribute__((always_inline)) A tile_max(const A* __restrict s) {
  A part[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) part[j] = s[j];
  for (int64_t c = kLanes; c < kTile; c += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] = s[c + j] > part[j] ? s[c + j] : part[j];
  A m = part[0];
  for (int64_t j = 1; j < kLanes; ++j) m = part[j] > m ? part[j] : m;
  return m;
}
template <typename A>
inline __attribute__((always_inline)) A tile_sum(const A* __restrict s) {
  A part[kLanes] = {};
  for (int64_t c = 0; c < kTile; c += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += s[c + j];
  A total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

// One call's operands; a unit of work is one (batch, head).
template <typename T, typename A>
struct Operands {
  View4<T> q, k, v, o, go;  // o, go: backward only
  const A* bias;            // [B | 1, T, S] or null
  const uint8_t* skip;
  A* stats;  // [2, B, H, T]: row max, log of the softmax denominator
  Shape g;
  A scale;
  T *out, *dq, *dk, *dv;  // [B, T | S, H, D]
};

// Per-thread scratch, kept across calls.
template <typename A>
std::vector<A>& scratch(int slot, size_t size) {
  thread_local std::vector<A> buffers[6];
  auto& buffer = buffers[slot];
  if (buffer.size() < size) buffer.resize(size);
  return buffer;
}

// D_: the head width when known at compile time (0: read from the shape), so
// that a row of D_ values stays in registers.
template <int D_, typename T, typename A>
inline __attribute__((always_inline)) void forward_unit(const Operands<T, A>& a, int64_t u) {
  const Shape& g = a.g;
  const int64_t d = D_ > 0 ? D_ : g.d;
  const int64_t sp = g.nk * kTile, units = g.b * g.h;
  const int64_t b = u / g.h, h = u % g.h, bb = g.bias_b > 1 ? b : 0;
  A* kt_buf = scratch<A>(0, size_t(d * sp)).data();
  A* v_buf = scratch<A>(1, size_t(sp * d)).data();
  A* qrow = scratch<A>(2, size_t(d)).data();
  A* acc = scratch<A>(3, size_t(d)).data();
  alignas(64) A s[kTile];
  load_keys(a.k, b, h, g, kt_buf, static_cast<A*>(nullptr));
  load_keys(a.v, b, h, g, static_cast<A*>(nullptr), v_buf);
  for (int64_t t = 0; t < g.t; ++t) {
    const T* qsrc = a.q.row(b, h, t);
    for (int64_t e = 0; e < d; ++e) qrow[e] = static_cast<A>(qsrc[e]) * a.scale;
    std::fill(acc, acc + d, A(0));
    A m = -std::numeric_limits<A>::infinity(), l = 0;
    const A* brow = a.bias ? a.bias + (bb * g.t + t) * g.s : nullptr;
    const uint8_t* srow = a.skip + (bb * g.nq + t / kRows) * g.nk;
    for (int64_t kt = 0; kt < g.nk; ++kt) {
      if (brow && srow[kt]) continue;
      const int64_t c0 = kt * kTile, cn = std::min(kTile, g.s - c0);
      tile_scores(qrow, kt_buf + c0, sp, d, brow ? brow + c0 : nullptr, cn, s);
      const A mt = tile_max(s);
      if (mt > m) {
        const A alpha = exp_acc(m - mt);
        l *= alpha;
        for (int64_t e = 0; e < d; ++e) acc[e] *= alpha;
        m = mt;
      }
      for (int64_t c = 0; c < kTile; ++c) s[c] = exp_acc(s[c] - m);
      l += tile_sum(s);
      const A* vt = v_buf + c0 * d;
      for (int64_t c = 0; c < cn; ++c) {
        const A p = s[c];
        const A* __restrict vr = vt + c * d;
        A* __restrict ar = acc;
        for (int64_t e = 0; e < d; ++e) ar[e] += p * vr[e];
      }
    }
    T* o = a.out + ((b * g.t + t) * g.h + h) * d;
    const A inv = A(1) / l;
    for (int64_t e = 0; e < d; ++e) o[e] = static_cast<T>(acc[e] * inv);
    a.stats[u * g.t + t] = m;
    a.stats[(units + u) * g.t + t] = std::log(l);
  }
}

// Backward of one (batch, head), a tile of kRows query rows at a time: the
// rows' weights P and score gradients dS for one key tile are computed first,
// then dV += P^T dO and dK += dS^T q with each key's row accumulated in
// registers over the query rows, and dq += dS K with each query's row in
// registers over the keys.
template <int D_, typename T, typename A>
inline __attribute__((always_inline)) void backward_unit(const Operands<T, A>& a, int64_t u) {
  const Shape& g = a.g;
  const int64_t d = D_ > 0 ? D_ : g.d;
  const int64_t sp = g.nk * kTile, units = g.b * g.h;
  const int64_t b = u / g.h, h = u % g.h, bb = g.bias_b > 1 ? b : 0;
  A* kt_buf = scratch<A>(0, size_t(d * sp)).data();
  A* k_buf = scratch<A>(1, size_t(sp * d)).data();
  A* vt_buf = scratch<A>(2, size_t(d * sp)).data();
  A* dk_buf = scratch<A>(3, size_t(sp * d)).data();
  A* dv_buf = scratch<A>(4, size_t(sp * d)).data();
  A* rows = scratch<A>(5, size_t(3 * kRows * d)).data();
  A *qs = rows, *gs = rows + kRows * d, *dqs = rows + 2 * kRows * d;  // [kRows][d] each
  alignas(64) A p[kRows][kTile];
  alignas(64) A ds[kRows][kTile];
  A delta[kRows], m[kRows], logl[kRows];
  load_keys(a.k, b, h, g, kt_buf, k_buf);
  load_keys(a.v, b, h, g, vt_buf, static_cast<A*>(nullptr));
  std::fill(dk_buf, dk_buf + sp * d, A(0));
  std::fill(dv_buf, dv_buf + sp * d, A(0));
  for (int64_t qt = 0; qt < g.nq; ++qt) {
    const int64_t r0 = qt * kRows, nr = std::min(kRows, g.t - r0);
    for (int64_t r = 0; r < nr; ++r) {
      const T* qsrc = a.q.row(b, h, r0 + r);
      const T* gsrc = a.go.row(b, h, r0 + r);
      const T* osrc = a.o.row(b, h, r0 + r);
      A dl = 0;  // sum_e dO * O: the softmax backward's row term
      for (int64_t e = 0; e < d; ++e) {
        qs[r * d + e] = static_cast<A>(qsrc[e]) * a.scale;
        gs[r * d + e] = static_cast<A>(gsrc[e]);
        dl += gs[r * d + e] * static_cast<A>(osrc[e]);
      }
      delta[r] = dl;
      m[r] = a.stats[u * g.t + r0 + r];
      logl[r] = a.stats[(units + u) * g.t + r0 + r];
    }
    std::fill(dqs, dqs + kRows * d, A(0));
    const uint8_t* srow = a.skip + (bb * g.nq + qt) * g.nk;
    for (int64_t kt = 0; kt < g.nk; ++kt) {
      if (a.bias && srow[kt]) continue;
      const int64_t c0 = kt * kTile, cn = std::min(kTile, g.s - c0);
      for (int64_t r = 0; r < nr; ++r) {
        const A* brow = a.bias ? a.bias + (bb * g.t + r0 + r) * g.s + c0 : nullptr;
        A* __restrict pr = p[r];
        A* __restrict dr = ds[r];
        tile_scores(qs + r * d, kt_buf + c0, sp, d, brow, cn, pr);
        for (int64_t c = 0; c < kTile; ++c) pr[c] = exp_acc((pr[c] - m[r]) - logl[r]);  // weights P
        for (int64_t c = 0; c < kTile; ++c) dr[c] = A(0);
        for (int64_t e = 0; e < d; ++e) {  // dP = dO . v_c
          const A ge = gs[r * d + e];
          const A* __restrict vr = vt_buf + e * sp + c0;
          for (int64_t c = 0; c < kTile; ++c) dr[c] += ge * vr[c];
        }
        for (int64_t c = 0; c < kTile; ++c) dr[c] = pr[c] * (dr[c] - delta[r]);  // dS
      }
      for (int64_t c = 0; c < cn; ++c) {
        A* __restrict dvr = dv_buf + (c0 + c) * d;
        A* __restrict dkr = dk_buf + (c0 + c) * d;
        for (int64_t r = 0; r < nr; ++r) {
          const A pv = p[r][c], dv = ds[r][c];
          const A* __restrict gr = gs + r * d;
          const A* __restrict qr = qs + r * d;
          for (int64_t e = 0; e < d; ++e) {
            dvr[e] += pv * gr[e];
            dkr[e] += dv * qr[e];
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        A* __restrict dqr = dqs + r * d;
        for (int64_t c = 0; c < cn; ++c) {
          const A dv = ds[r][c];
          const A* __restrict kr = k_buf + (c0 + c) * d;
          for (int64_t e = 0; e < d; ++e) dqr[e] += dv * kr[e];
        }
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      T* dqo = a.dq + ((b * g.t + r0 + r) * g.h + h) * d;
      for (int64_t e = 0; e < d; ++e) dqo[e] = static_cast<T>(dqs[r * d + e] * a.scale);
    }
  }
  for (int64_t j = 0; j < g.s; ++j) {
    T* dko = a.dk + ((b * g.s + j) * g.h + h) * d;
    T* dvo = a.dv + ((b * g.s + j) * g.h + h) * d;
    for (int64_t e = 0; e < d; ++e) {
      dko[e] = static_cast<T>(dk_buf[j * d + e]);
      dvo[e] = static_cast<T>(dv_buf[j * d + e]);
    }
  }
}

// Run-time ISA choice: the unit functions compiled for AVX-512, AVX2 + FMA
// and the build's baseline (float32 and bfloat16; float64 is the gradcheck
// path and stays on the baseline). The OpenMP region stays outside them: GCC
// outlines a region into a function of the baseline ISA.
template <typename T, typename A>
using UnitFn = void (*)(const Operands<T, A>&, int64_t);

template <int D_, typename T, typename A>
void forward_baseline(const Operands<T, A>& a, int64_t u) {
  forward_unit<D_>(a, u);
}
template <int D_, typename T, typename A>
void backward_baseline(const Operands<T, A>& a, int64_t u) {
  backward_unit<D_>(a, u);
}
#if defined(__x86_64__) && defined(__GNUC__)
#define VLMKIT_ISA_CLONES 1
#define VLMKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
template <int D_, typename T>
VLMKIT_AVX512 void forward_avx512(const Operands<T, float>& a, int64_t u) {
  forward_unit<D_>(a, u);
}
template <int D_, typename T>
__attribute__((target("avx2,fma"))) void forward_avx2(const Operands<T, float>& a, int64_t u) {
  forward_unit<D_>(a, u);
}
template <int D_, typename T>
VLMKIT_AVX512 void backward_avx512(const Operands<T, float>& a, int64_t u) {
  backward_unit<D_>(a, u);
}
template <int D_, typename T>
__attribute__((target("avx2,fma"))) void backward_avx2(const Operands<T, float>& a, int64_t u) {
  backward_unit<D_>(a, u);
}
#undef VLMKIT_AVX512
int isa() { return cpu_isa(); }  // 2: AVX-512, 1: AVX2 + FMA, 0: baseline
#endif

template <int D_, typename T, typename A>
UnitFn<T, A> pick_unit(bool backward) {
  UnitFn<T, A> fn = backward ? &backward_baseline<D_, T, A> : &forward_baseline<D_, T, A>;
#ifdef VLMKIT_ISA_CLONES
  if constexpr (std::is_same<A, float>::value) {
    if (isa() == 2) fn = backward ? &backward_avx512<D_, T> : &forward_avx512<D_, T>;
    else if (isa() == 1) fn = backward ? &backward_avx2<D_, T> : &forward_avx2<D_, T>;
  }
#endif
  return fn;
}

template <typename T, typename A>
void run_units(const Operands<T, A>& a, bool backward) {
  // Compile-time head widths for the common cases (float32 / bfloat16 only:
  // float64 is the gradcheck path).
  UnitFn<T, A> fn = pick_unit<0, T, A>(backward);
  if constexpr (std::is_same<A, float>::value) {
    if (a.g.d == 32) fn = pick_unit<32, T, A>(backward);
    else if (a.g.d == 64) fn = pick_unit<64, T, A>(backward);
  }
  const int64_t units = a.g.b * a.g.h;
  run_parallel(units, threads_for(units), [&](int64_t u) { fn(a, u); });
}

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bias) {
  Shape g;
  g.b = q.size(0);
  g.h = q.size(1);
  g.t = q.size(2);
  g.d = q.size(3);
  g.s = k.size(2);
  g.nk = (g.s + kTile - 1) / kTile;
  g.nq = (g.t + kRows - 1) / kRows;
  g.bias_b = bias.defined() ? bias.size(0) : 0;
  return g;
}

// The bias as a contiguous [B | 1, T, S] tensor of the accumulation dtype.
at::Tensor bias_acc(const at::Tensor& bias, at::ScalarType acc) {
  if (!bias.defined()) return bias;
  return bias.reshape({bias.size(0), bias.size(2), bias.size(3)}).to(acc).contiguous();
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor unit_stride(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

struct FusedAttention : public torch::autograd::Function<FusedAttention> {
  // `bias_or_empty`: autograd's apply() cannot take an undefined tensor, so
  // "no bias" travels as a tensor with no elements.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias_or_empty, double scale) {
    const at::Tensor bias = bias_or_empty.numel() > 0 ? bias_or_empty : at::Tensor();
    auto [out, stats, skip] = fused_attention_forward(q, k, v, bias, scale);
    ctx->save_for_backward({q, k, v, out});
    ctx->saved_data["bias"] = bias_or_empty;
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["skip"] = skip;
    ctx->saved_data["scale"] = scale;
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused attention: a double backward (create_graph=True) is not supported; call "
                "vlmkit.set_attention_kernel(\"aten\") first");
    auto saved = ctx->get_saved_variables();
    at::Tensor bias = ctx->saved_data["bias"].toTensor();
    if (bias.numel() == 0) bias = at::Tensor();
    auto [dq, dk, dv] = fused_attention_backward(grads[0], saved[0], saved[1], saved[2], bias, saved[3],
                                                 ctx->saved_data["stats"].toTensor(),
                                                 ctx->saved_data["skip"].toTensor(), ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

double blocked_tile_fraction(const at::Tensor& bias) {
  if (!bias.defined() || bias.dim() != 4 || bias.numel() == 0) return 0.0;
  Shape g;
  g.b = bias.size(0);
  g.t = bias.size(2);
  g.s = bias.size(3);
  g.h = g.d = 1;
  g.nk = (g.s + kTile - 1) / kTile;
  g.nq = (g.t + kRows - 1) / kRows;
  g.bias_b = g.b;
  const auto b = bias_acc(bias, at::kFloat);
  return skip_map(b.data_ptr<float>(), g).to(at::kFloat).mean().item<double>();
}

bool use_fused_attention(const at::Tensor& q, int64_t s, const at::Tensor& bias) {
  const int mode = g_kernel.load();
  if (mode != 0) return mode == 1;
  // Measured on 2 cores (benchmarks/attention.py; docs/benchmarks.md, "Fused
  // attention"): forward + backward beat ATen in float32 where the mask lets
  // the kernel skip most tiles (packed rows: 1.5x); plain causal and unmasked
  // attention were 0.87-0.97x, and every bfloat16 case 0.2-0.4x (oneDNN's
  // bf16 GEMMs). The choice must not depend on grad mode: an
  // activation-checkpointed block runs its forward without gradients and
  // recomputes it with them, and the two must agree bit for bit.
  return q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(2) >= 96 && s >= 96 && bias.defined() &&
         blocked_tile_fraction(bias) >= 0.5;
}

std::string fused_attention_unsupported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& bias) {
  if (!q.defined() || !k.defined() || !v.defined()) return "undefined q, k or v";
  if (!q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu()) return "tensors not on the CPU";
  const auto dt = q.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && dt != at::kBFloat16) return "dtype other than float32/64, bfloat16";
  if (k.scalar_type() != dt || v.scalar_type() != dt) return "q, k and v of different dtypes";
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return "q, k, v not 4-D [B, H, L, Dh]";
  if (k.sizes() != v.sizes() || k.size(0) != q.size(0) || k.size(1) != q.size(1) || k.size(3) != q.size(3))
    return "q [B, H, T, Dh] and k, v [B, H, S, Dh] do not match";
  if (q.size(2) == 0 || k.size(2) == 0 || q.size(3) == 0) return "empty sequence";
  if (bias.defined()) {
    if (!bias.device().is_cpu() || !bias.is_floating_point()) return "bias not a floating CPU tensor";
    if (bias.requires_grad()) return "bias that needs a gradient";
    if (bias.dim() != 4 || (bias.size(0) != 1 && bias.size(0) != q.size(0)) || bias.size(1) != 1 ||
        bias.size(2) != q.size(2) || bias.size(3) != k.size(2))
      return "bias not of shape [B | 1, 1, T, S]";
  }
  return "";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                       const at::Tensor& v_in, const at::Tensor& bias,
                                                                       double scale) {
  const auto why = fused_attention_unsupported(q_in, k_in, v_in, bias);
  TORCH_CHECK_VALUE(why.empty(), "fused_attention: unsupported inputs (", why, ")");
  const auto q = unit_stride(q_in), k = unit_stride(k_in), v = unit_stride(v_in);
  const Shape g = shape_of(q, k, bias);
  const auto acc = acc_type(q.scalar_type());
  const auto b = bias_acc(bias, acc);
  auto out = at::empty({g.b, g.t, g.h, g.d}, q.options());
  auto stats = at::empty({2, g.b, g.h, g.t}, q.options().dtype(acc));
  at::Tensor skip;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "fused_attention_forward", [&] {
    using A = typename Acc<scalar_t>::type;
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    skip = skip_map(bp, g);
    Operands<scalar_t, A> a{view4<scalar_t>(q), view4<scalar_t>(k), view4<scalar_t>(v), {}, {}, bp,
                            skip.data_ptr<uint8_t>(), stats.data_ptr<A>(), g, static_cast<A>(scale),
                            out.data_ptr<scalar_t>(), nullptr, nullptr, nullptr};
    run_units(a, false);
  });
  return {out.permute({0, 2, 1, 3}), stats, skip};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& bias, const at::Tensor& out_in, const at::Tensor& stats, const at::Tensor& skip, double scale) {
  const auto q = unit_stride(q_in), k = unit_stride(k_in), v = unit_stride(v_in), o = unit_stride(out_in);
  const auto go = unit_stride(grad_out.to(q.scalar_type()));
  TORCH_CHECK_VALUE(go.sizes() == q.sizes(), "fused_attention_backward: expected grad_out of shape ", q.sizes(),
                    ", got ", grad_out.sizes());
  const Shape g = shape_of(q, k, bias);
  const auto acc = acc_type(q.scalar_type());
  const auto b = bias_acc(bias, acc);
  auto dq = at::empty({g.b, g.t, g.h, g.d}, q.options());
  auto dk = at::empty({g.b, g.s, g.h, g.d}, q.options());
  auto dv = at::empty({g.b, g.s, g.h, g.d}, q.options());
  const auto st = stats.contiguous();
  const auto sk = skip.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "fused_attention_backward", [&] {
    using A = typename Acc<scalar_t>::type;
    Operands<scalar_t, A> a{view4<scalar_t>(q), view4<scalar_t>(k), view4<scalar_t>(v), view4<scalar_t>(o),
                            view4<scalar_t>(go), b.defined() ? b.data_ptr<A>() : nullptr, sk.data_ptr<uint8_t>(),
                            const_cast<A*>(st.data_ptr<A>()), g, static_cast<A>(scale), nullptr,
                            dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>()};
    run_units(a, true);
  });
  return {dq.permute({0, 2, 1, 3}), dk.permute({0, 2, 1, 3}), dv.permute({0, 2, 1, 3})};
}

at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                           double scale) {
  if (!at::GradMode::is_enabled() || !(q.requires_grad() || k.requires_grad() || v.requires_grad()))
    return std::get<0>(fused_attention_forward(q, k, v, bias, scale));
  return FusedAttention::apply(q, k, v, bias.defined() ? bias : at::empty({0}, q.options()), scale);
}


// ---------------------------------------------------------------------------
// Rotary positions (kernels/attention.h, rotary).

namespace {

// Rows [begin, end) of x [B, H, T, Dh] (unit stride in Dh): with (c, s) the
// row's cos and sin and `sign` +1, y1 = x1 c - x2 s and y2 = x2 c + x1 s over the
// two halves; `sign` -1 rotates back (the backward, the transpose of the rotation).
template <typename T>
inline __attribute__((always_inline)) void rotary_rows(const T* __restrict x, T* __restrict y,
                                                       const typename Acc<T>::type* __restrict cos,
                                                       const typename Acc<T>::type* __restrict sin,
                                                       const int64_t* xs, const int64_t* ys, int64_t heads,
                                                       int64_t length, int64_t half, bool back, int64_t begin,
                                                       int64_t end) {
  using A = typename Acc<T>::type;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = r % length, bh = r / length, h = bh % heads, b = bh / heads;
    const T* xr = x + b * xs[0] + h * xs[1] + t * xs[2];
    T* yr = y + b * ys[0] + h * ys[1] + t * ys[2];
    const A* c = cos + (b * length + t) * half;
    const A* sn = sin + (b * length + t) * half;
    for (int64_t i = 0; i < half; ++i) {
      const A x1 = load(xr, i), x2 = load(xr, i + half);
      const A si = back ? -sn[i] : sn[i];
      store(yr, i, x1 * c[i] - x2 * si);
      store(yr, i + half, x2 * c[i] + x1 * si);
    }
  }
}

template <typename T>
using RotaryFn = void (*)(const T*, T*, const typename Acc<T>::type*, const typename Acc<T>::type*, const int64_t*,
                          const int64_t*, int64_t, int64_t, int64_t, bool, int64_t, int64_t);

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void rotary_avx512(
    const T* x, T* y, const typename Acc<T>::type* c, const typename Acc<T>::type* s, const int64_t* xs,
    const int64_t* ys, int64_t heads, int64_t length, int64_t half, bool back, int64_t b, int64_t e) {
  rotary_rows(x, y, c, s, xs, ys, heads, length, half, back, b, e);
}
template <typename T>
__attribute__((target("avx2,fma"))) void rotary_avx2(const T* x, T* y, const typename Acc<T>::type* c,
                                                     const typename Acc<T>::type* s, const int64_t* xs,
                                                     const int64_t* ys, int64_t heads, int64_t length, int64_t half,
                                                     bool back, int64_t b, int64_t e) {
  rotary_rows(x, y, c, s, xs, ys, heads, length, half, back, b, e);
}
#endif

template <typename T>
RotaryFn<T> pick_rotary() {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (!std::is_same<T, double>::value) {
    if (cpu_isa() == 2) return &rotary_avx512<T>;
    if (cpu_isa() == 1) return &rotary_avx2<T>;
  }
#endif
  return &rotary_rows<T>;
}

// y (x's layout where it is dense, else contiguous) = x rotated by the table.
at::Tensor rotate(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool back) {
  const auto x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  auto y = at::empty_like(x);
  if (y.stride(-1) != 1) y = at::empty(x.sizes(), x.options());
  const int64_t heads = x.size(1), length = x.size(2), half = x.size(3) / 2;
  const int64_t rows = x.size(0) * heads * length;
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)}, ys[3] = {y.stride(0), y.stride(1), y.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "vlmkit_rotary", [&] {
    using A = typename Acc<scalar_t>::type;
    const auto fn = pick_rotary<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const A* cp = cos.data_ptr<A>();
    const A* sp = sin.data_ptr<A>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(2 * half, 1)),
                     [&](int64_t b, int64_t e) { fn(xp, yp, cp, sp, xs, ys, heads, length, half, back, b, e); });
  });
  return y;
}

struct Rotary : public torch::autograd::Function<Rotary> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rotate(x, cos, sin, false);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused rotary: a double backward (create_graph=True) is not supported; call "
                "vlmkit.set_attention_kernel(\"aten\") first");
    auto saved = ctx->get_saved_variables();
    return {rotate(grads[0], saved[0], saved[1], true), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 4 && x.size(3) % 2 == 0,
                    "rotary: expected x [B, H, T, Dh] with an even Dh, got ", x.sizes());
  const auto s = x.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16,
                    "rotary: expected x of float32, float64 or bfloat16, got ", s);
  const auto acc = s == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> table{x.size(0), x.size(2), x.size(3) / 2};
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK_VALUE(t->defined() && t->scalar_type() == acc && t->is_contiguous() && t->numel() == x.size(0) * x.size(2) * (x.size(3) / 2) &&
                          t->size(0) == x.size(0) && t->size(-1) == x.size(3) / 2 && t->size(-2) == x.size(2),
                      "rotary: expected cos and sin [B, (1,) T, Dh/2] of ", acc, ", contiguous, for x ", x.sizes(),
                      ", got ", t->defined() ? t->sizes() : at::IntArrayRef{}, " of ",
                      t->defined() ? t->scalar_type() : at::ScalarType::Undefined);
  TORCH_CHECK_VALUE(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
                    "rotary: expected CPU tensors, got x on ", x.device());
  if (at::GradMode::is_enabled() && x.requires_grad()) return Rotary::apply(x, cos, sin);
  return rotate(x, cos, sin, false);
}

}  // namespace kernels
}  // namespace vlmkit
