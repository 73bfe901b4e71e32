// Fused CPU decoding step (kernels/decode.h).
#include "vlmkit/kernels/decode.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "switch.h"
#include "vec_math.h"

namespace vlmkit {
namespace {
kernels::KernelSwitch g_decode_kernel("set_decode_kernel");
}  // namespace

void set_decode_kernel(const std::string& kernel) { g_decode_kernel.set(kernel); }

std::string decode_kernel() { return g_decode_kernel.get(); }

namespace kernels {
namespace {

/// What one step works on: the weights, the cache, the rows' inputs and scratch.
struct StepArgs {
  const DecodeWeights* w;
  int64_t rows, length, capacity, context_len;
  int64_t wide;  // max(d_model, the MLP's hidden width): the row stride of y and tmp
  float* const* key;      // per layer [N, Hkv, capacity, Dh]
  float* const* value;
  const float* const* cross_key;  // per layer [N, Hkv, M, Dh] (null: no cross-attention)
  const float* const* cross_value;
  const unsigned char* padding;          // [N, capacity]
  const unsigned char* context_padding;  // [N, M] or null
  const int64_t* ids;
  const int64_t* positions;
  float* x;        // [N, d] residual stream
  float* y;        // [N, max(d, hidden)] normed input / MLP hidden
  float* q;        // [N, H * Dh]
  float* kv;       // [N, 2 * Hkv * Dh]
  float* attn;     // [N, H * Dh]
  float* tmp;      // [N, max(d, hidden)]
  float* scores;   // [max(capacity, M)]
  const float* rotary;  // [N, Dh]: each row's cos (first half) and sin at its position
  float* logits;   // [N, V]
};

inline __attribute__((always_inline)) float dot(const float* __restrict a, const float* __restrict b, int64_t k) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < k; ++i) s += a[i] * b[i];
  return s;
}

/// y[n] = W x[n] + b for the N rows (each weight row read once for all rows).
inline __attribute__((always_inline)) void linear(const DecodeLinear& l, const float* x, int64_t x_stride, float* y,
                                                  int64_t y_stride, int64_t rows) {
  for (int64_t o = 0; o < l.out; ++o) {
    const float* wr = l.weight + o * l.in;
    const float b = l.bias ? l.bias[o] : 0.f;
    for (int64_t n = 0; n < rows; ++n) y[n * y_stride + o] = dot(wr, x + n * x_stride, l.in) + b;
  }
}

inline __attribute__((always_inline)) void norm(const DecodeNorm& nm, const float* x, float* y, int64_t dim) {
  if (nm.bias) {  // LayerNorm: biased variance, as torch.layer_norm
    float mean = 0.f;
    for (int64_t i = 0; i < dim; ++i) mean += x[i];
    mean /= float(dim);
    float var = 0.f;
    for (int64_t i = 0; i < dim; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / std::sqrt(var / float(dim) + nm.eps);
    for (int64_t i = 0; i < dim; ++i) y[i] = (x[i] - mean) * inv * nm.weight[i] + nm.bias[i];
  } else {  // RMSNorm
    float ms = 0.f;
    for (int64_t i = 0; i < dim; ++i) ms += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(ms / float(dim) + nm.eps);
    for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * inv * nm.weight[i];
  }
}

/// Rotate-half rotary embedding of one head vector, with the row's cos / sin
/// table [Dh / 2] each.
inline __attribute__((always_inline)) void rotate(float* v, int64_t half, const float* cos, const float* sin) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i] + a * sin[i];
  }
}

/// softmax(q K^T * scale, masked) V for one query head over `len` keys of stride dh.
inline __attribute__((always_inline)) void attend(const float* q, const float* keys, const float* values,
                                                  const unsigned char* blocked, int64_t len, int64_t dh, float scale,
                                                  float* scores, float* out) {
  float best = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int64_t s = 0; s < len; ++s) {
    scores[s] = dot(q, keys + s * dh, dh) * scale;
    if (!(blocked && blocked[s])) {
      best = std::max(best, scores[s]);
      any = true;
    }
  }
  // A row whose every key is blocked gets uniform weights, as the reference's
  // lowest-value fill gives.
  for (int64_t s = 0; s < len; ++s)
    scores[s] = !any ? 1.0f : (blocked && blocked[s]) ? 0.0f : exp_f32(scores[s] - best);
  float total = 0.f;
  for (int64_t s = 0; s < len; ++s) total += scores[s];
  const float inv = 1.0f / total;
  for (int64_t e = 0; e < dh; ++e) out[e] = 0.f;
  for (int64_t s = 0; s < len; ++s) {
    const float p = scores[s] * inv;
    const float* v = values + s * dh;
    for (int64_t e = 0; e < dh; ++e) out[e] += p * v[e];
  }
}

inline __attribute__((always_inline)) void step_body(const StepArgs& a) {
  const DecodeWeights& w = *a.w;
  const int64_t d = w.d_model, h = w.num_heads, kvh = w.kv_heads, dh = w.head_dim, n_rows = a.rows;
  const int64_t group = h / kvh, slot = a.length, len = a.length + 1;
  const float scale = 1.0f / std::sqrt(float(dh));
  const int64_t wide = a.wide;

  for (int64_t n = 0; n < n_rows; ++n) {
    const float* e = w.token_embed + a.ids[n] * d;
    float* x = a.x + n * d;
    for (int64_t i = 0; i < d; ++i) x[i] = e[i];
    if (w.pos_embed) {
      const float* p = w.pos_embed + a.positions[n] * d;
      for (int64_t i = 0; i < d; ++i) x[i] += p[i];
    }
  }
  for (size_t li = 0; li < w.layers.size(); ++li) {
    const DecodeLayer& l = w.layers[li];
    // Self-attention over the cache and this step's position.
    for (int64_t n = 0; n < n_rows; ++n) norm(l.norm1, a.x + n * d, a.y + n * wide, d);
    linear(l.self.q, a.y, wide, a.q, h * dh, n_rows);
    linear(l.self.k, a.y, wide, a.kv, 2 * kvh * dh, n_rows);
    linear(l.self.v, a.y, wide, a.kv + kvh * dh, 2 * kvh * dh, n_rows);
    for (int64_t n = 0; n < n_rows; ++n) {
      float* qn = a.q + n * h * dh;
      float* kn = a.kv + n * 2 * kvh * dh;
      float* vn = kn + kvh * dh;
      if (l.self.qk_norm) {
        for (int64_t j = 0; j < h; ++j) norm(l.self.q_norm, qn + j * dh, qn + j * dh, dh);
        for (int64_t j = 0; j < kvh; ++j) norm(l.self.k_norm, kn + j * dh, kn + j * dh, dh);
      }
      if (w.rotary) {
        const float* cos = a.rotary + n * dh;
        for (int64_t j = 0; j < h; ++j) rotate(qn + j * dh, dh / 2, cos, cos + dh / 2);
        for (int64_t j = 0; j < kvh; ++j) rotate(kn + j * dh, dh / 2, cos, cos + dh / 2);
      }
      for (int64_t j = 0; j < kvh; ++j) {
        const int64_t at = ((n * kvh + j) * a.capacity + slot) * dh;
        std::memcpy(a.key[li] + at, kn + j * dh, sizeof(float) * size_t(dh));
        std::memcpy(a.value[li] + at, vn + j * dh, sizeof(float) * size_t(dh));
      }
      for (int64_t j = 0; j < h; ++j) {
        const int64_t base = (n * kvh + j / group) * a.capacity * dh;
        attend(qn + j * dh, a.key[li] + base, a.value[li] + base, a.padding + n * a.capacity, len, dh, scale,
               a.scores, a.attn + (n * h + j) * dh);
      }
    }
    linear(l.self.o, a.attn, h * dh, a.tmp, wide, n_rows);
    for (int64_t n = 0; n < n_rows; ++n)
      for (int64_t i = 0; i < d; ++i) a.x[n * d + i] += a.tmp[n * wide + i];
    // Cross-attention over the context's cached keys and values.
    if (l.has_cross) {
      for (int64_t n = 0; n < n_rows; ++n) norm(l.norm_cross, a.x + n * d, a.y + n * wide, d);
      linear(l.cross.q, a.y, wide, a.q, h * dh, n_rows);
      for (int64_t n = 0; n < n_rows; ++n) {
        float* qn = a.q + n * h * dh;
        const int64_t ckvh = l.cross.kv_heads, cgroup = h / ckvh;
        for (int64_t j = 0; j < h; ++j) {
          if (l.cross.qk_norm) norm(l.cross.q_norm, qn + j * dh, qn + j * dh, dh);
          const int64_t base = (n * ckvh + j / cgroup) * a.context_len * dh;
          attend(qn + j * dh, a.cross_key[li] + base, a.cross_value[li] + base,
                 a.context_padding ? a.context_padding + n * a.context_len : nullptr, a.context_len, dh, scale,
                 a.scores, a.attn + (n * h + j) * dh);
        }
      }
      linear(l.cross.o, a.attn, h * dh, a.tmp, wide, n_rows);
      for (int64_t n = 0; n < n_rows; ++n)
        for (int64_t i = 0; i < d; ++i) a.x[n * d + i] += l.cross_gate * a.tmp[n * wide + i];
    }
    // MLP.
    for (int64_t n = 0; n < n_rows; ++n) norm(l.norm2, a.x + n * d, a.y + n * wide, d);
    if (l.swiglu) {
      linear(l.gate, a.y, wide, a.tmp, wide, n_rows);
      for (int64_t n = 0; n < n_rows; ++n) {
        const float* yn = a.y + n * wide;
        float* g = a.tmp + n * wide;
        for (int64_t o = 0; o < l.gate.out; ++o)
          g[o] = g[o] / (1.0f + exp_f32(-g[o])) * dot(l.up.weight + o * l.up.in, yn, l.up.in);
      }
      linear(l.down, a.tmp, wide, a.y, wide, n_rows);
    } else {
      linear(l.fc1, a.y, wide, a.tmp, wide, n_rows);
      for (int64_t n = 0; n < n_rows; ++n) {
        float* g = a.tmp + n * wide;
        for (int64_t i = 0; i < l.fc1.out; ++i) g[i] = 0.5f * g[i] * (1.0f + erf_f32(g[i] * 0.70710678118654752f));
      }
      linear(l.fc2, a.tmp, wide, a.y, wide, n_rows);
    }
    for (int64_t n = 0; n < n_rows; ++n)
      for (int64_t i = 0; i < d; ++i) a.x[n * d + i] += a.y[n * wide + i];
  }
  for (int64_t n = 0; n < n_rows; ++n) norm(w.final_norm, a.x + n * d, a.y + n * wide, d);
  const float* head = w.lm_head ? w.lm_head : w.token_embed;
  for (int64_t v = 0; v < w.vocab; ++v)
    for (int64_t n = 0; n < n_rows; ++n) a.logits[n * w.vocab + v] = dot(head + v * d, a.y + n * wide, d);
}

// Run-time ISA choice, as kernels/attention.cpp: the body compiled for
// AVX-512, AVX2 + FMA and the build's baseline.
void step_baseline(const StepArgs& a) { step_body(a); }
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void step_avx512(const StepArgs& a) {
  step_body(a);
}
__attribute__((target("avx2,fma"))) void step_avx2(const StepArgs& a) { step_body(a); }
using StepFn = void (*)(const StepArgs&);
StepFn pick_step() {
  static const StepFn fn = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
                               ? &step_avx512
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &step_avx2
                                                                                              : &step_baseline;
  return fn;
}
#else
using StepFn = void (*)(const StepArgs&);
StepFn pick_step() { return &step_baseline; }
#endif

void check_rows(const at::Tensor& t, int64_t rows, const char* what, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 1 && t.size(0) == rows && t.scalar_type() == dtype && t.device().is_cpu(),
                    "FusedDecoder::step: expected ", what, " of shape [", rows, "] and dtype ", dtype, " on the CPU");
}
}  // namespace

FusedDecoder::FusedDecoder(DecodeWeights weights, const std::vector<std::pair<at::Tensor, at::Tensor>>& self_kv,
                           const at::Tensor& key_padding, const std::vector<std::pair<at::Tensor, at::Tensor>>& cross_kv,
                           const at::Tensor& context_padding, int64_t capacity)
    : w_(std::move(weights)), capacity_(capacity) {
  const size_t layers = w_.layers.size();
  TORCH_CHECK_VALUE(self_kv.size() == layers && cross_kv.size() == layers, "FusedDecoder: expected the caches of ",
                    layers, " layers");
  TORCH_CHECK_VALUE(key_padding.defined() && key_padding.dim() == 2 && key_padding.scalar_type() == at::kBool,
                    "FusedDecoder: expected a [N, L] bool key padding mask");
  rows_ = key_padding.size(0);
  length_ = key_padding.size(1);
  TORCH_CHECK_VALUE(capacity_ >= length_, "FusedDecoder: capacity ", capacity_, " is below the cached length ",
                    length_);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (size_t l = 0; l < layers; ++l) {
    const auto& [k, v] = self_kv[l];
    TORCH_CHECK_VALUE(k.defined() && k.dim() == 4 && k.size(0) == rows_ && k.size(1) == w_.kv_heads &&
                          k.size(2) == length_ && k.size(3) == w_.head_dim && v.sizes() == k.sizes(),
                      "FusedDecoder: layer ", l, "'s cache does not match the decoder");
    // Positions past the cached length are written before any step reads them.
    key_.push_back(at::empty({rows_, w_.kv_heads, capacity_, w_.head_dim}, f32));
    value_.push_back(at::empty({rows_, w_.kv_heads, capacity_, w_.head_dim}, f32));
    key_.back().narrow(2, 0, length_).copy_(k);
    value_.back().narrow(2, 0, length_).copy_(v);
    const auto& [ck, cv] = cross_kv[l];
    TORCH_CHECK_VALUE(ck.defined() == w_.layers[l].has_cross, "FusedDecoder: layer ", l,
                      (w_.layers[l].has_cross ? " needs" : " has no"), " cross-attention keys");
    if (ck.defined()) {
      TORCH_CHECK_VALUE(ck.dim() == 4 && ck.size(0) == rows_ && ck.size(1) == w_.layers[l].cross.kv_heads &&
                            ck.size(3) == w_.head_dim && cv.sizes() == ck.sizes() &&
                            (context_len_ == 0 || ck.size(2) == context_len_),
                        "FusedDecoder: layer ", l, "'s context keys do not match the decoder");
      context_len_ = ck.size(2);
      cross_key_.push_back(ck.to(at::kFloat).contiguous());
      cross_value_.push_back(cv.to(at::kFloat).contiguous());
    } else {
      cross_key_.emplace_back();
      cross_value_.emplace_back();
    }
  }
  for (const auto& l : w_.layers) wide_ = std::max(wide_, l.swiglu ? l.gate.out : l.fc1.out);
  wide_ = std::max(wide_, w_.d_model);
  padding_.assign(size_t(rows_ * capacity_), 0);
  auto kp = key_padding.contiguous();
  const bool* kpp = kp.data_ptr<bool>();
  for (int64_t n = 0; n < rows_; ++n)
    for (int64_t s = 0; s < length_; ++s) padding_[size_t(n * capacity_ + s)] = kpp[n * length_ + s];
  if (context_padding.defined() && context_len_ > 0) {
    TORCH_CHECK_VALUE(context_padding.dim() == 2 && context_padding.size(0) == rows_ &&
                          context_padding.size(1) == context_len_ && context_padding.scalar_type() == at::kBool,
                      "FusedDecoder: expected a [", rows_, ", ", context_len_, "] bool context padding mask");
    auto cp = context_padding.contiguous();
    context_padding_.assign(cp.data_ptr<bool>(), cp.data_ptr<bool>() + rows_ * context_len_);
  }
}

at::Tensor FusedDecoder::step(const at::Tensor& ids, const at::Tensor& pad, const at::Tensor& positions) {
  check_rows(ids, rows_, "ids", at::kLong);
  check_rows(pad, rows_, "pad", at::kBool);
  check_rows(positions, rows_, "positions", at::kLong);
  TORCH_CHECK_VALUE(length_ < capacity_, "FusedDecoder::step: the cache is full (", capacity_, " positions)");
  auto id = ids.contiguous(), pos = positions.contiguous(), pd = pad.contiguous();
  const int64_t* idp = id.data_ptr<int64_t>();
  const int64_t* posp = pos.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows_; ++n) {
    TORCH_CHECK_INDEX(idp[n] >= 0 && idp[n] < w_.vocab, "FusedDecoder::step: token id ", idp[n],
                      " outside the vocabulary [0, ", w_.vocab, ")");
    TORCH_CHECK_VALUE(posp[n] >= 0 && (w_.rotary || posp[n] < w_.max_len), "FusedDecoder::step: position ",
                      posp[n], " exceeds the context length max_len=", w_.max_len);
    padding_[size_t(n * capacity_ + length_)] = pd.data_ptr<bool>()[n];
  }
  const int64_t d = w_.d_model, wide = wide_, hd = w_.num_heads * w_.head_dim;
  // One scratch buffer for every intermediate (per call: a few KB at batch 1).
  const int64_t sizes[] = {rows_ * d, rows_ * wide, rows_ * hd, rows_ * 2 * w_.kv_heads * w_.head_dim,
                           rows_ * hd, rows_ * wide, std::max(capacity_, context_len_)};
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  scratch_.resize(static_cast<size_t>(total));
  auto logits = at::empty({rows_, w_.vocab}, at::TensorOptions().dtype(at::kFloat));
  std::vector<float*> key(key_.size()), value(value_.size());
  std::vector<const float*> cross_key(key_.size(), nullptr), cross_value(key_.size(), nullptr);
  for (size_t l = 0; l < key_.size(); ++l) {
    key[l] = key_[l].data_ptr<float>();
    value[l] = value_[l].data_ptr<float>();
    if (cross_key_[l].defined()) {
      cross_key[l] = cross_key_[l].data_ptr<float>();
      cross_value[l] = cross_value_[l].data_ptr<float>();
    }
  }
  StepArgs a{};
  a.w = &w_;
  a.rows = rows_;
  a.length = length_;
  a.capacity = capacity_;
  a.context_len = context_len_;
  a.wide = wide;
  a.key = key.data();
  a.value = value.data();
  a.cross_key = cross_key.data();
  a.cross_value = cross_value.data();
  a.padding = padding_.data();
  a.context_padding = context_padding_.empty() ? nullptr : context_padding_.data();
  a.ids = idp;
  a.positions = posp;
  float* p = scratch_.data();
  float** slots[] = {&a.x, &a.y, &a.q, &a.kv, &a.attn, &a.tmp, &a.scores};
  for (size_t i = 0; i < 7; ++i) {
    *slots[i] = p;
    p += sizes[i];
  }
  // Rotary angles in float64, rounded to float32, as detail::apply_rotary.
  std::vector<float>& rotary = rotary_;
  if (w_.rotary) {
    const int64_t dh = w_.head_dim, half = dh / 2;
    rotary.resize(size_t(rows_ * dh));
    for (int64_t n = 0; n < rows_; ++n)
      for (int64_t i = 0; i < half; ++i) {
        const double inv_freq = 1.0 / std::pow(w_.rope_theta, double(i) * (2.0 / double(dh)));
        const double angle = double(posp[n]) * inv_freq;
        rotary[size_t(n * dh + i)] = float(std::cos(angle));
        rotary[size_t(n * dh + half + i)] = float(std::sin(angle));
      }
  }
  a.rotary = rotary.data();
  a.logits = logits.data_ptr<float>();
  pick_step()(a);
  ++length_;
  return logits;
}

void FusedDecoder::select(const at::Tensor& index) {
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == rows_ && index.scalar_type() == at::kLong,
                    "FusedDecoder::select: expected [", rows_, "] int64 row indices");
  auto idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows_; ++n)
    TORCH_CHECK_INDEX(ip[n] >= 0 && ip[n] < rows_, "FusedDecoder::select: row ", ip[n], " outside [0, ", rows_, ")");
  for (size_t l = 0; l < key_.size(); ++l) {
    key_[l] = key_[l].index_select(0, idx);
    value_[l] = value_[l].index_select(0, idx);
    if (cross_key_[l].defined()) {
      cross_key_[l] = cross_key_[l].index_select(0, idx);
      cross_value_[l] = cross_value_[l].index_select(0, idx);
    }
  }
  std::vector<unsigned char> padding(padding_.size());
  for (int64_t n = 0; n < rows_; ++n)
    std::memcpy(padding.data() + n * capacity_, padding_.data() + ip[n] * capacity_, size_t(capacity_));
  padding_.swap(padding);
  if (!context_padding_.empty()) {
    std::vector<unsigned char> cp(context_padding_.size());
    for (int64_t n = 0; n < rows_; ++n)
      std::memcpy(cp.data() + n * context_len_, context_padding_.data() + ip[n] * context_len_, size_t(context_len_));
    context_padding_.swap(cp);
  }
}

}  // namespace kernels
}  // namespace vlmkit
