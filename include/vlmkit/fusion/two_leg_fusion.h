#pragma once
/// Fusion blocks for the Two-Leg architecture. Each takes the image and text
/// encoder outputs and returns one fused vector per sample, [B, dim].
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/normalization.h>

#include "vlmkit/modules/encoder.h"
#include "vlmkit/modules/linear.h"
#include "vlmkit/modules/transformer.h"
#include "vlmkit/options/fusion.h"

namespace vlmkit {

/// concat(image.pooled, text.pooled) -> Linear -> GELU -> Dropout -> Linear.
class ConcatMlpFusionImpl final : public FusionModule {
 public:
  explicit ConcatMlpFusionImpl(ConcatMlpFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override;

  ConcatMlpFusionOptions options;
  Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(ConcatMlpFusion);

/// Softmax-weighted sum over modalities of their projected pooled vectors.
/// `last_weights()` holds the [B, 2] (image, text) weights of the last call.
class AttentionFusionImpl final : public FusionModule {
 public:
  explicit AttentionFusionImpl(AttentionFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override;
  const torch::Tensor& last_weights() const { return last_weights_; }

  AttentionFusionOptions options;
  Linear image_proj{nullptr}, text_proj{nullptr}, score_hidden{nullptr},
      score_out{nullptr};

 private:
  torch::Tensor last_weights_;
};
TORCH_MODULE(AttentionFusion);

/// Gated multimodal unit: out = z * tanh(W_i x_i) + (1 - z) * tanh(W_t x_t),
/// z = sigmoid(W_z [x_i; x_t]).
class GatedFusionImpl final : public FusionModule {
 public:
  explicit GatedFusionImpl(GatedFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override;

  GatedFusionOptions options;
  Linear image_proj{nullptr}, text_proj{nullptr}, gate{nullptr};
};
TORCH_MODULE(GatedFusion);

/// Text tokens attend to image tokens through `num_layers` transformer blocks
/// with cross-attention, then a LayerNorm and a masked mean over text.
class CrossAttentionFusionImpl final : public FusionModule {
 public:
  explicit CrossAttentionFusionImpl(CrossAttentionFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override;

  CrossAttentionFusionOptions options;
  Linear text_proj{nullptr};  // only when text_dim != dim
  torch::nn::ModuleList blocks{nullptr};
  Norm norm{nullptr};
};
TORCH_MODULE(CrossAttentionFusion);

}  // namespace vlmkit
