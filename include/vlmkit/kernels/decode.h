#pragma once
/// Fused CPU decoding step: one new token per row through a pre-norm decoder
/// (vlmkit::TextDecoder) in plain loops over the weights, with its own KV
/// cache, so a step costs its arithmetic and not ~20 ATen dispatches per layer
/// (the approach of llama.cpp for small batches). At batch 1 the default small
/// decoder's step is ~90 tiny ops through ATen, whose per-op overhead is most
/// of the step; here it is one call (docs/benchmarks.md, "Generation").
///
/// Generation (generate/generate.h) runs the prompt through the decoder's own
/// forward (prefill), hands the cache to this kernel, and feeds every later
/// token through it where `decode_kernel()` is "auto" and the decoder
/// qualifies (not: CUDA, autocast, non-float32 weights, unmerged LoRA
/// adapters, dropout while training).
/// Every block option of the decoder is covered: LayerNorm / RMSNorm, GELU /
/// SwiGLU MLP, rotary / learned positions, grouped-query heads, q/k norms,
/// cross-attention (gated or not). Tokens equal the ATen path's up to float
/// rounding (tests compare logits and greedy tokens).
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace vlmkit {

/// Which implementation generation's cached steps run on CPU:
///   "auto" (default) the fused step where the decoder qualifies;
///   "aten" always the decoder's forward (the reference).
/// Process-wide, like set_attention_kernel.
void set_decode_kernel(const std::string& kernel);
std::string decode_kernel();

namespace kernels {

/// A norm's parameters: LayerNorm (bias set) or RMSNorm (bias null).
struct DecodeNorm {
  const float* weight = nullptr;
  const float* bias = nullptr;
  float eps = 1e-5f;
};

/// y = x W^T + b, W [out, in] row-major; bias may be null.
struct DecodeLinear {
  const float* weight = nullptr;
  const float* bias = nullptr;
  int64_t out = 0, in = 0;
};

struct DecodeAttention {
  DecodeLinear q, k, v, o;
  int64_t kv_heads = 0;  // key/value heads (fewer than the query heads: grouped-query)
  bool qk_norm = false;
  DecodeNorm q_norm, k_norm;  // per head (RMSNorm over the head width)
};

struct DecodeLayer {
  DecodeNorm norm1, norm_cross, norm2;
  DecodeAttention self, cross;
  bool has_cross = false;
  float cross_gate = 1.0f;  // tanh(cross_gate) of a gated block, else 1
  bool swiglu = false;
  DecodeLinear fc1, fc2;          // GELU MLP
  DecodeLinear gate, up, down;    // SwiGLU MLP
};

/// The decoder's weights as float32 CPU pointers (storage keeps them alive).
struct DecodeWeights {
  int64_t d_model = 0, num_heads = 0, kv_heads = 0 /* self-attention's */, head_dim = 0, vocab = 0, max_len = 0;
  bool rotary = true;
  double rope_theta = 10000.0;
  const float* token_embed = nullptr;  // [vocab, d]
  const float* pos_embed = nullptr;    // learned positions [max_len, d]; null with rotary
  const float* lm_head = nullptr;      // [vocab, d]; null: tied to token_embed
  DecodeNorm final_norm;
  std::vector<DecodeLayer> layers;
  std::vector<at::Tensor> storage;
};

/// The decoding state of N rows: each layer's keys and values in a buffer of
/// `capacity` positions, and which cached positions are padding.
class FusedDecoder {
 public:
  /// self_kv[l]: layer l's cached keys and values after the prompt, [N, Hkv, L, Dh]
  /// each (rotary applied, as the decoder's cache holds them); key_padding [N, L]
  /// bool (true = padding); cross_kv[l]: the context's keys and values of a layer
  /// with cross-attention [N, Hkv, M, Dh] (undefined elsewhere); context_padding
  /// [N, M] bool or undefined. capacity >= L: the most positions the cache will hold.
  FusedDecoder(DecodeWeights weights, const std::vector<std::pair<at::Tensor, at::Tensor>>& self_kv,
               const at::Tensor& key_padding, const std::vector<std::pair<at::Tensor, at::Tensor>>& cross_kv,
               const at::Tensor& context_padding, int64_t capacity);

  /// Feeds token ids [N] (int64) at positions [N] (int64); pad [N] bool marks rows
  /// whose new position is padding (finished rows). Returns the logits [N, V] (float32).
  at::Tensor step(const at::Tensor& ids, const at::Tensor& pad, const at::Tensor& positions);

  /// Rows take the state of rows `index` [N] (beam search).
  void select(const at::Tensor& index);

  int64_t rows() const { return rows_; }
  int64_t length() const { return length_; }

 private:
  DecodeWeights w_;
  int64_t rows_ = 0, length_ = 0, capacity_ = 0, context_len_ = 0;
  int64_t wide_ = 0;  // max(d_model, the widest MLP hidden layer): the stride of the wide scratch rows
  std::vector<at::Tensor> key_, value_;              // per layer [N, Hkv, capacity, Dh]
  std::vector<at::Tensor> cross_key_, cross_value_;  // per layer [N, Hkv, M, Dh] (cross layers)
  std::vector<unsigned char> padding_;               // [N, capacity], 1 = padding
  std::vector<unsigned char> context_padding_;       // [N, M]
  std::vector<float> scratch_, rotary_;              // a step's intermediates
};

}  // namespace kernels
}  // namespace vlmkit
