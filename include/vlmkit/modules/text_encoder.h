#pragma once
/// Bidirectional transformer text encoder.
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>

#include "vlmkit/modules/encoder.h"
#include "vlmkit/modules/transformer.h"
#include "vlmkit/options/text_encoder.h"

namespace vlmkit {

/// Token + learned position embeddings, pre-norm transformer blocks with key
/// padding masks, a final LayerNorm and padding-aware pooling: padding never
/// changes the pooled vector of a sequence.
///
/// Shape: token_ids [B, T] int64 with T <= max_len and ids in [0, vocab_size)
///   -> tokens [B, T, d_model], pooled [B, d_model], padding_mask [B, T].
class TextEncoderImpl final : public TextEncoderModule {
 public:
  using Options = TextEncoderOptions;
  static constexpr const char* kName = "transformer";

  explicit TextEncoderImpl(TextEncoderOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;

  EncoderOutput forward(const torch::Tensor& token_ids,
                        const torch::Tensor& padding_mask = {}) override;
  /// Validates ids [B, T] and returns the padding mask (given or ids == pad_id).
  torch::Tensor check_ids(const torch::Tensor& token_ids, const torch::Tensor& padding_mask = {}) const;
  /// Token + position embeddings [B, T, D] (ids already checked).
  torch::Tensor embed(const torch::Tensor& token_ids);
  /// The transformer blocks and final norm on any embedded sequence [B, S, D].
  torch::Tensor encode(const torch::Tensor& embeds, const torch::Tensor& padding_mask);
  int64_t output_dim() const override { return options.d_model(); }
  nlohmann::json config() const override { return slot_config(*this); }

  TextEncoderOptions options;
  torch::nn::Embedding token_embed{nullptr};
  torch::Tensor pos_embed;  // [1, max_len, D]
  torch::nn::ModuleList blocks{nullptr};
  Norm norm{nullptr};
};
TORCH_MODULE(TextEncoder);

namespace detail {
/// Validates token ids [B, T] int64 within [0, vocab) and T <= max_len, and
/// returns the padding mask (given, or ids == pad_id).
torch::Tensor check_token_ids(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                              int64_t vocab_size, int64_t max_len, int64_t pad_id,
                              const char* who);
}  // namespace detail

}  // namespace vlmkit
