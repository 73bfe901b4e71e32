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
#include "vlmkit/registry.h"

namespace vlmkit {

/// The Two-Leg fusion slot: rows build a fusion from (config, path,
/// image_dim, text_dim); the widths come from the encoders.
using FusionRegistry = SlotRegistry<FusionModule, int64_t, int64_t>;
FusionRegistry& fusion_registry();

/// Registers `Impl` (see slot_row in registry.h) from its source file, at
/// namespace scope.
#define VLMKIT_REGISTER_FUSION(Impl, python_class, doc) \
  VLMKIT_REGISTER(::vlmkit::fusion_registry(),          \
                  (::vlmkit::slot_row<Impl, ::vlmkit::FusionModule>(python_class, doc, int64_t{1}, int64_t{1})))

/// concat(image.pooled, text.pooled) -> Linear -> GELU -> Dropout -> Linear.
class ConcatMlpFusionImpl final : public FusionModule {
 public:
  using Options = ConcatMlpFusionOptions;
  static constexpr const char* kName = "concat_mlp";

  explicit ConcatMlpFusionImpl(ConcatMlpFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override { return slot_config(*this); }

  ConcatMlpFusionOptions options;
  Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(ConcatMlpFusion);

/// Softmax-weighted sum over modalities of their projected pooled vectors.
/// `last_weights()` holds the [B, 2] (image, text) weights of the last call.
class AttentionFusionImpl final : public FusionModule {
 public:
  using Options = AttentionFusionOptions;
  static constexpr const char* kName = "attention";

  explicit AttentionFusionImpl(AttentionFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override { return slot_config(*this); }
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
  using Options = GatedFusionOptions;
  static constexpr const char* kName = "gated";

  explicit GatedFusionImpl(GatedFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override { return slot_config(*this); }

  GatedFusionOptions options;
  Linear image_proj{nullptr}, text_proj{nullptr}, gate{nullptr};
};
TORCH_MODULE(GatedFusion);

/// Text tokens attend to image tokens through `num_layers` transformer blocks
/// with cross-attention, then a LayerNorm and a masked mean over text.
class CrossAttentionFusionImpl final : public FusionModule {
 public:
  using Options = CrossAttentionFusionOptions;
  static constexpr const char* kName = "cross_attention";

  explicit CrossAttentionFusionImpl(CrossAttentionFusionOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) override;
  int64_t output_dim() const override { return options.dim(); }
  nlohmann::json config() const override { return slot_config(*this); }

  CrossAttentionFusionOptions options;
  Linear text_proj{nullptr};  // only when text_dim != dim
  torch::nn::ModuleList blocks{nullptr};
  Norm norm{nullptr};
};
TORCH_MODULE(CrossAttentionFusion);

}  // namespace vlmkit
