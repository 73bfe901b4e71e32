#pragma once
/// Losses as separate modules (TorchMultimodal's modules/losses): each has a
/// free function (the math) and a module wrapper for composition.
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <string>

#include "vlmkit/registry.h"

namespace vlmkit {

/// CLIP's symmetric InfoNCE: mean of the cross-entropies over rows and over
/// columns of the [B, B] image-text logits, matching pairs on the diagonal.
torch::Tensor clip_loss(const torch::Tensor& logits_per_image);

/// SigLIP's sigmoid loss: -1/B * sum_ij log sigmoid(z_ij * logits_ij) with
/// z = +1 on the diagonal and -1 elsewhere; logits already scaled and biased.
torch::Tensor siglip_loss(const torch::Tensor& logits_per_image);

/// Cross-entropy over classes with optional label smoothing; logits [B, C],
/// labels [B] int64 in [0, C).
torch::Tensor classification_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                                  double label_smoothing = 0.0);

/// Binary image-text matching: BCE-with-logits; logits [B], labels [B] in {0, 1}.
torch::Tensor matching_loss(const torch::Tensor& logits, const torch::Tensor& labels);

/// The Two-Tower objective slot (its config's "loss"): a contrastive loss over
/// the [B, B] image-text logits, matching pairs on the diagonal. Rows register
/// from src/losses/losses.cpp (VLMKIT_REGISTER(contrastive_loss_table(), ...)).
struct ContrastiveLossRow {
  std::string name;
  /// One line: what it is and where it comes from.
  std::string doc;
  /// The model learns an additive logit bias (SigLIP's; its config's
  /// logit_bias_init), added to the logits for the loss and at inference.
  bool learned_bias = false;
  std::function<torch::Tensor(const torch::Tensor& logits_per_image)> loss;
};
using ContrastiveLossTable = NamedTable<ContrastiveLossRow>;
ContrastiveLossTable& contrastive_loss_table();

class ClipLossImpl : public torch::nn::Cloneable<ClipLossImpl> {
 public:
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& logits_per_image) {
    return clip_loss(logits_per_image);
  }
};
TORCH_MODULE(ClipLoss);

class SigLipLossImpl : public torch::nn::Cloneable<SigLipLossImpl> {
 public:
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& logits_per_image) {
    return siglip_loss(logits_per_image);
  }
};
TORCH_MODULE(SigLipLoss);

class ClassificationLossImpl : public torch::nn::Cloneable<ClassificationLossImpl> {
 public:
  explicit ClassificationLossImpl(double label_smoothing = 0.0)
      : label_smoothing(label_smoothing) {}
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& logits, const torch::Tensor& labels) {
    return classification_loss(logits, labels, label_smoothing);
  }
  double label_smoothing;
};
TORCH_MODULE(ClassificationLoss);

class MatchingLossImpl : public torch::nn::Cloneable<MatchingLossImpl> {
 public:
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& logits, const torch::Tensor& labels) {
    return matching_loss(logits, labels);
  }
};
TORCH_MODULE(MatchingLoss);

}  // namespace vlmkit
