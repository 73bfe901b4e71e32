#pragma once
/// Options for the architectures' own parts (heads, temperatures, losses).
/// Slot blocks (encoders, fusion) carry their own options.
#include <torch/arg.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace vlmkit {

struct TwoTowerOptions {
  /// Width of the shared embedding space.
  TORCH_ARG(int64_t, embed_dim) = 128;
  /// The contrastive objective, a row of contrastive_loss_table() (losses/losses.h):
  /// "clip" (CLIP's InfoNCE) or "siglip" (SigLIP's sigmoid loss, learned bias).
  TORCH_ARG(std::string, loss) = "clip";
  /// Initial log logit scale: CLIP uses log(1/0.07); SigLIP uses log(10).
  TORCH_ARG(double, logit_scale_init) = std::log(1.0 / 0.07);
  /// CLIP clamps the logit scale (not its log) to at most 100.
  TORCH_ARG(double, max_logit_scale) = 100.0;
  /// SigLIP's learnable bias, initialised at -10 (used by the siglip loss only).
  TORCH_ARG(double, logit_bias_init) = -10.0;
};

template <class V>
void visit_fields(TwoTowerOptions& o, V& v) {
  v("embed_dim", o.embed_dim());
  v("loss", o.loss());
  v("logit_scale_init", o.logit_scale_init());
  v("max_logit_scale", o.max_logit_scale());
  v("logit_bias_init", o.logit_bias_init());
}

struct ClassificationHeadOptions {
  ClassificationHeadOptions(int64_t in_dim = 256, int64_t num_classes = 16)
      : in_dim_(in_dim), num_classes_(num_classes) {}
  TORCH_ARG(int64_t, in_dim);
  /// Number of outputs (1 for matching).
  TORCH_ARG(int64_t, num_classes);
  /// 0: a single Linear; otherwise Linear -> GELU -> Linear with this width.
  TORCH_ARG(int64_t, hidden_dim) = 0;
  TORCH_ARG(double, dropout) = 0.0;
};

template <class V>
void visit_fields(ClassificationHeadOptions& o, V& v) {
  v("num_classes", o.num_classes());
  v("hidden_dim", o.hidden_dim());
  v("dropout", o.dropout());
}

/// The matching head's: one output.
struct MatchingHeadOptions : ClassificationHeadOptions {
  explicit MatchingHeadOptions(int64_t in_dim = 256) : ClassificationHeadOptions(in_dim, 1) {}
};

template <class V>
void visit_fields(MatchingHeadOptions& o, V& v) {
  visit_fields(static_cast<ClassificationHeadOptions&>(o), v);
}

struct TwoLegOptions {
  /// Label smoothing of the classification loss.
  TORCH_ARG(double, label_smoothing) = 0.0;
};

template <class V>
void visit_fields(TwoLegOptions& o, V& v) {
  v("label_smoothing", o.label_smoothing());
}

}  // namespace vlmkit
