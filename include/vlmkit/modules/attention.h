#pragma once
/// Multi-head scaled dot-product attention (Vaswani et al. 2017), usable as
/// self- or cross-attention, with padding masks, causal masks and a KV cache.
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>

#include "vlmkit/modules/linear.h"
#include "vlmkit/modules/norm.h"
#include "vlmkit/options/attention.h"

namespace vlmkit {

/// Keys and values of earlier steps, [B, Hkv, S, Dh] each (Hkv: the key/value
/// heads, fewer than the query heads with grouped-query attention).
/// Self-attention appends to it on every call; cross-attention fills it on the
/// first call and reuses it afterwards (image keys/values computed once).
struct KVCache {
  torch::Tensor key;    // the first length() positions of the storage below
  torch::Tensor value;
  int64_t length() const { return key.defined() ? key.size(2) : 0; }
  bool empty() const { return !key.defined(); }
  void clear() { *this = KVCache(); }
  /// Self-attention: appends [B, Hkv, T, Dh] keys and values. The storage
  /// grows by doubling, so a decoding step copies its own positions only (a
  /// concatenation would copy the whole cache every step). Copies of a cache
  /// share that storage: to branch a generation, select() rows (it copies).
  void append(const torch::Tensor& k, const torch::Tensor& v) {
    const int64_t len = length(), need = len + k.size(2);
    if (torch::GradMode::is_enabled() && (k.requires_grad() || v.requires_grad() || (len > 0 && key.requires_grad()))) {
      // Under autograd the storage cannot be written in place (earlier steps'
      // graphs hold views of it): concatenate.
      key = len > 0 ? torch::cat({key, k}, 2) : k;
      value = len > 0 ? torch::cat({value, v}, 2) : v;
      key_storage_ = value_storage_ = torch::Tensor();
      return;
    }
    if (!key_storage_.defined() || key_storage_.size(2) < need || key_storage_.size(0) != k.size(0)) {
      const int64_t capacity = std::max<int64_t>({need, 2 * len, 16});
      auto grown_k = torch::empty({k.size(0), k.size(1), capacity, k.size(3)}, k.options());
      auto grown_v = torch::empty({v.size(0), v.size(1), capacity, v.size(3)}, v.options());
      if (len > 0) {
        grown_k.slice(2, 0, len).copy_(key);
        grown_v.slice(2, 0, len).copy_(value);
      }
      key_storage_ = grown_k;
      value_storage_ = grown_v;
    }
    key_storage_.slice(2, len, need).copy_(k);
    value_storage_.slice(2, len, need).copy_(v);
    key = key_storage_.slice(2, 0, need);
    value = value_storage_.slice(2, 0, need);
  }
  /// Rows take the keys and values of rows `index` (beam search).
  void select(const torch::Tensor& index) {
    if (empty()) return;
    const int64_t len = length();
    if (key_storage_.defined()) {
      key_storage_ = key_storage_.index_select(0, index);
      value_storage_ = value_storage_.index_select(0, index);
      key = key_storage_.slice(2, 0, len);
      value = value_storage_.slice(2, 0, len);
    } else {
      key = key.index_select(0, index);
      value = value.index_select(0, index);
    }
  }

 private:
  torch::Tensor key_storage_, value_storage_;  // [B, Hkv, capacity, Dh]; undefined for cross-attention
};

/// Boolean masks use PyTorch's nn.MultiheadAttention convention: true marks a
/// position that must NOT be attended.
///
/// Args (forward):
///   x: queries [B, T, D].
///   context: keys/values source [B, S, Dc] for cross-attention; undefined
///     means self-attention on x.
///   key_padding_mask: [B, S] bool, true = padding. With a self-attention
///     cache, S covers the cached and the new positions.
///   attn_mask: [T, S] or [B, T, S], bool (true = blocked) or floating
///     (added to the scores, e.g. a large negative value where blocked).
///   causal: query t (at absolute position past + t) sees keys <= past + t.
///   cache: optional KVCache (see above).
///   positions: [B, T] int64 positions for rotary attention; undefined means
///     past, past + 1, ... (past = cached length).
/// Shape: returns [B, T, D].
class MultiheadAttentionImpl : public torch::nn::Cloneable<MultiheadAttentionImpl> {
 public:
  explicit MultiheadAttentionImpl(MultiheadAttentionOptions options_ = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {},
                        const torch::Tensor& key_padding_mask = {},
                        const torch::Tensor& attn_mask = {}, bool causal = false,
                        KVCache* cache = nullptr, const torch::Tensor& positions = {});

  /// Key/value heads (num_kv_heads, or num_heads when 0).
  int64_t kv_heads() const { return options.num_kv_heads() > 0 ? options.num_kv_heads() : options.num_heads(); }

  MultiheadAttentionOptions options;
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
  Norm q_norm{nullptr}, k_norm{nullptr};  // qk_norm only
};
TORCH_MODULE(MultiheadAttention);

namespace detail {
/// The additive-mask fill value: the lowest finite value of the dtype, so a
/// row with every key masked yields uniform weights instead of NaN.
double mask_fill_value(torch::ScalarType dtype);
/// The additive attention mask [B | 1, 1, T, S] in `dtype` that MultiheadAttention
/// adds to its scores: key_padding_mask [B, S] bool, attn_mask [T, S] or
/// [B, T, S] (bool: true = blocked; floating: added) and causal (query t at
/// absolute position past + t sees keys <= past + t), combined; undefined when
/// there is nothing to mask. Shapes are the caller's to check. The bool masks
/// are filled at their own size (H times smaller than the scores), cheaper
/// than filling the scores through a broadcast bool mask, in backward too.
torch::Tensor attention_bias(const torch::Tensor& key_padding_mask, const torch::Tensor& attn_mask, bool causal,
                             int64_t t, int64_t s, int64_t past, torch::ScalarType dtype, torch::Device device);
/// Rotary embedding (rotate-half form) of x [B, H, T, Dh] at positions [B, T].
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& positions, double theta);
}  // namespace detail

}  // namespace vlmkit
