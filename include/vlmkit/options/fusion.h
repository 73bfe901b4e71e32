#pragma once
/// Options for the Two-Leg fusion blocks. Input widths come from the
/// encoders, so they are constructor arguments and not config keys.
#include <torch/arg.h>

#include <cstdint>

#include "vlmkit/detail/enum_names.h"

namespace vlmkit {

/// concat(pooled image, pooled text) -> Linear -> GELU -> Linear.
struct ConcatMlpFusionOptions {
  ConcatMlpFusionOptions(int64_t image_dim = 128, int64_t text_dim = 128)
      : image_dim_(image_dim), text_dim_(text_dim) {}
  TORCH_ARG(int64_t, image_dim);
  TORCH_ARG(int64_t, text_dim);
  /// Output width.
  TORCH_ARG(int64_t, dim) = 256;
  /// MLP hidden width; 0 means dim.
  TORCH_ARG(int64_t, hidden_dim) = 0;
  TORCH_ARG(double, dropout) = 0.0;
};

template <class V>
void visit_fields(ConcatMlpFusionOptions& o, V& v) {
  v("dim", o.dim());
  v("hidden_dim", o.hidden_dim());
  v("dropout", o.dropout());
}

/// Attention fusion: each modality's pooled vector is projected to `dim`,
/// scored by a small MLP, and the outputs are mixed by softmax weights over
/// modalities (additive attention, Bahdanau et al. 2015, applied across
/// modalities).
struct AttentionFusionOptions {
  AttentionFusionOptions(int64_t image_dim = 128, int64_t text_dim = 128)
      : image_dim_(image_dim), text_dim_(text_dim) {}
  TORCH_ARG(int64_t, image_dim);
  TORCH_ARG(int64_t, text_dim);
  TORCH_ARG(int64_t, dim) = 256;
  /// Width of the scoring MLP; 0 means dim.
  TORCH_ARG(int64_t, hidden_dim) = 0;
};

template <class V>
void visit_fields(AttentionFusionOptions& o, V& v) {
  v("dim", o.dim());
  v("hidden_dim", o.hidden_dim());
}

/// Gated multimodal unit (Arevalo et al. 2017):
///   h_i = tanh(W_i x_i), h_t = tanh(W_t x_t), z = sigmoid(W_z [x_i; x_t]),
///   out = z * h_i + (1 - z) * h_t.
struct GatedFusionOptions {
  GatedFusionOptions(int64_t image_dim = 128, int64_t text_dim = 128)
      : image_dim_(image_dim), text_dim_(text_dim) {}
  TORCH_ARG(int64_t, image_dim);
  TORCH_ARG(int64_t, text_dim);
  TORCH_ARG(int64_t, dim) = 256;
};

template <class V>
void visit_fields(GatedFusionOptions& o, V& v) {
  v("dim", o.dim());
}

/// Token-level fusion: text tokens run through transformer blocks whose
/// cross-attention reads the image tokens; the result is mean-pooled over
/// the non-padding text positions.
struct CrossAttentionFusionOptions {
  CrossAttentionFusionOptions(int64_t image_dim = 128, int64_t text_dim = 128)
      : image_dim_(image_dim), text_dim_(text_dim) {}
  TORCH_ARG(int64_t, image_dim);
  TORCH_ARG(int64_t, text_dim);
  TORCH_ARG(int64_t, dim) = 128;
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(int64_t, num_heads) = 4;
  TORCH_ARG(double, mlp_ratio) = 4.0;
  TORCH_ARG(double, dropout) = 0.0;
};

template <class V>
void visit_fields(CrossAttentionFusionOptions& o, V& v) {
  v("dim", o.dim());
  v("num_layers", o.num_layers());
  v("num_heads", o.num_heads());
  v("mlp_ratio", o.mlp_ratio());
  v("dropout", o.dropout());
}

}  // namespace vlmkit
