#pragma once
/// Options for the bidirectional text encoder.
#include <torch/arg.h>

#include <cstdint>

#include "vlmkit/detail/enum_names.h"
#include "vlmkit/options/attention.h"

namespace vlmkit {

/// How a sequence becomes one vector: mean over non-padding tokens, the first
/// token, or the last non-padding token (CLIP's EOS pooling).
enum class TextPool { mean, cls, last };

VLMKIT_ENUM_NAMES(TextPool, "text pooling", {TextPool::mean, "mean"}, {TextPool::cls, "cls"},
                  {TextPool::last, "last"});

/// Options for `TextEncoder`: token + learned position embeddings, a
/// bidirectional pre-norm transformer and padding-aware pooling.
struct TextEncoderOptions {
  /// The default covers the byte-level tokenizer (256 bytes + specials).
  TORCH_ARG(int64_t, vocab_size) = 512;
  TORCH_ARG(int64_t, max_len) = 64;
  TORCH_ARG(int64_t, d_model) = 128;
  TORCH_ARG(int64_t, depth) = 4;
  TORCH_ARG(int64_t, num_heads) = 4;
  TORCH_ARG(double, mlp_ratio) = 4.0;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(TextPool, pool) = TextPool::mean;
  /// Token id treated as padding when no explicit mask is given.
  TORCH_ARG(int64_t, pad_id) = 0;
  /// Norm and MLP of the blocks (and the final norm).
  TORCH_ARG(NormType, norm) = NormType::layernorm;
  TORCH_ARG(MlpType, mlp) = MlpType::gelu;
  /// Activation checkpointing of the blocks while training (less memory, one more forward).
  TORCH_ARG(bool, activation_checkpointing) = false;
};

template <class V>
void visit_fields(TextEncoderOptions& o, V& v) {
  v("vocab_size", o.vocab_size());
  v("max_len", o.max_len());
  v("d_model", o.d_model());
  v("depth", o.depth());
  v("num_heads", o.num_heads());
  v("mlp_ratio", o.mlp_ratio());
  v("dropout", o.dropout());
  v("pool", o.pool());
  v("pad_id", o.pad_id());
  v("norm", o.norm());
  v("mlp", o.mlp());
  v("activation_checkpointing", o.activation_checkpointing());
}

}  // namespace vlmkit
