#pragma once
/// Options for multi-head attention and pre-norm transformer blocks.
#include <torch/arg.h>

#include <cstdint>

#include "vlmkit/detail/enum_names.h"

namespace vlmkit {

/// LayerNorm (Ba et al. 2016; weight and bias) or RMSNorm (Zhang & Sennrich
/// 2019; weight only, as Llama, Qwen2 and SmolLM use).
enum class NormType { layernorm, rmsnorm };
VLMKIT_ENUM_NAMES(NormType, "norm", {NormType::layernorm, "layernorm"}, {NormType::rmsnorm, "rmsnorm"});

/// The block's MLP: Linear-GELU-Linear (fc1, fc2), or SwiGLU (Shazeer 2020):
/// down_proj(silu(gate_proj(x)) * up_proj(x)), bias-free as in Llama.
enum class MlpType { gelu, swiglu };
VLMKIT_ENUM_NAMES(MlpType, "MLP", {MlpType::gelu, "gelu"}, {MlpType::swiglu, "swiglu"});

/// Options for `MultiheadAttention` (self- or cross-attention).
///
/// Example:
///   MultiheadAttention attn(MultiheadAttentionOptions(128, 4).context_dim(256));
struct MultiheadAttentionOptions {
  MultiheadAttentionOptions(int64_t embed_dim = 128, int64_t num_heads = 4)
      : embed_dim_(embed_dim), num_heads_(num_heads) {}
  /// Width of the queries and of the output.
  TORCH_ARG(int64_t, embed_dim);
  TORCH_ARG(int64_t, num_heads);
  /// Width of the key/value input for cross-attention; 0 means embed_dim.
  TORCH_ARG(int64_t, context_dim) = 0;
  /// Dropout on the attention weights (training only).
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bias) = true;
  /// Rotary position embedding on queries and keys (self-attention only);
  /// needs an even head width.
  TORCH_ARG(bool, rotary) = false;
  TORCH_ARG(double, rope_theta) = 10000.0;
  /// Grouped-query attention (Ainslie et al. 2023): keys and values have this
  /// many heads, each shared by num_heads / num_kv_heads query heads (the KV
  /// cache holds only these); 0 means num_heads (multi-head), 1 multi-query.
  TORCH_ARG(int64_t, num_kv_heads) = 0;
  /// RMSNorm of each head's queries and keys before rotary (q_norm, k_norm;
  /// as Qwen3 and OLMo-2).
  TORCH_ARG(bool, qk_norm) = false;
};

template <class V>
void visit_fields(MultiheadAttentionOptions& o, V& v) {
  v("embed_dim", o.embed_dim());
  v("num_heads", o.num_heads());
  v("context_dim", o.context_dim());
  v("dropout", o.dropout());
  v("bias", o.bias());
  v("rotary", o.rotary());
  v("rope_theta", o.rope_theta());
  v("num_kv_heads", o.num_kv_heads());
  v("qk_norm", o.qk_norm());
}

/// Options for a pre-norm transformer block:
///   x = x + SelfAttn(LN(x)); [x = x + g * CrossAttn(LN(x), context)]; x = x + MLP(LN(x))
struct TransformerBlockOptions {
  TransformerBlockOptions(int64_t d_model = 128, int64_t num_heads = 4)
      : d_model_(d_model), num_heads_(num_heads) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_heads);
  /// Hidden width of the MLP as a multiple of d_model.
  TORCH_ARG(double, mlp_ratio) = 4.0;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(double, norm_eps) = 1e-5;
  /// Adds a cross-attention sub-layer reading a context sequence.
  TORCH_ARG(bool, cross_attention) = false;
  /// Width of the context for cross-attention; 0 means d_model.
  TORCH_ARG(int64_t, context_dim) = 0;
  /// Flamingo-style tanh gate on the cross-attention residual, starting closed (0).
  TORCH_ARG(bool, gated_cross_attention) = false;
  /// Rotary positions in the self-attention sub-layer.
  TORCH_ARG(bool, rotary) = false;
  TORCH_ARG(double, rope_theta) = 10000.0;
  TORCH_ARG(NormType, norm) = NormType::layernorm;
  TORCH_ARG(MlpType, mlp) = MlpType::gelu;
  /// Self-attention key/value heads (0: num_heads); see MultiheadAttentionOptions.
  TORCH_ARG(int64_t, num_kv_heads) = 0;
  TORCH_ARG(bool, qk_norm) = false;
};

template <class V>
void visit_fields(TransformerBlockOptions& o, V& v) {
  v("d_model", o.d_model());
  v("num_heads", o.num_heads());
  v("mlp_ratio", o.mlp_ratio());
  v("dropout", o.dropout());
  v("norm_eps", o.norm_eps());
  v("cross_attention", o.cross_attention());
  v("context_dim", o.context_dim());
  v("gated_cross_attention", o.gated_cross_attention());
  v("rotary", o.rotary());
  v("rope_theta", o.rope_theta());
  v("norm", o.norm());
  v("mlp", o.mlp());
  v("num_kv_heads", o.num_kv_heads());
  v("qk_norm", o.qk_norm());
}

}  // namespace vlmkit
