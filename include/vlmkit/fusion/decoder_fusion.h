#pragma once
/// Fusion of projected image tokens into the text decoder: `concat` splices
/// them into the token sequence at the <image> placeholders; `cross_attention`
/// hands them to the decoder's cross-attention layers.
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "vlmkit/options/decoder.h"

namespace vlmkit {

/// Label value that the loss ignores (prompt, image and padding positions).
constexpr int64_t kIgnoreIndex = -100;

/// What the decoder consumes, produced by a fusion block.
struct DecoderInputs {
  torch::Tensor embeds;        // [B, L, D]
  torch::Tensor padding_mask;  // [B, L] bool, true = padding
  torch::Tensor positions;     // [B, L] int64
  /// [B] int64: positions < prefix_len attend bidirectionally under the
  /// prefix-LM policy (image + prompt); the first labelled position or L.
  torch::Tensor prefix_len;
  torch::Tensor labels;        // [B, L] int64 or undefined
  torch::Tensor context;       // [B, N, D] cross-attention memory or undefined
  torch::Tensor context_mask;  // [B, N] bool or undefined
};

/// Positions 0, 1, ... counting only non-padding tokens (pads get 0).
torch::Tensor positions_from_mask(const torch::Tensor& padding_mask);

/// The decoder-fusion slot contract.
///   text_embeds [B, T, D], token_ids [B, T], padding_mask [B, T],
///   memory [I, M, D] (I images, M tokens each), memory_mask [I, M] or
///   undefined, labels [B, T] or undefined.
class DecoderFusionModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  virtual DecoderInputs fuse(const torch::Tensor& text_embeds, const torch::Tensor& token_ids,
                             const torch::Tensor& padding_mask, const torch::Tensor& memory,
                             const torch::Tensor& memory_mask, const torch::Tensor& labels) = 0;
  virtual DecoderFusionType type() const = 0;
};

/// Each <image> placeholder (image_token_id) is replaced by the M tokens of
/// the next image, in order, so a sample may hold several images; the number
/// of placeholders must equal the number of images. Labels at image
/// positions become kIgnoreIndex. Output is right-padded.
class ConcatFusionImpl final : public DecoderFusionModule {
 public:
  explicit ConcatFusionImpl(int64_t image_token_id = 3)
      : DecoderFusionModule("vlmkit::ConcatFusion"), image_token_id(image_token_id) {}
  DecoderInputs fuse(const torch::Tensor& text_embeds, const torch::Tensor& token_ids,
                     const torch::Tensor& padding_mask, const torch::Tensor& memory,
                     const torch::Tensor& memory_mask, const torch::Tensor& labels) override;
  DecoderFusionType type() const override { return DecoderFusionType::concat; }
  int64_t image_token_id;
};
TORCH_MODULE(ConcatFusion);

/// One image per sample (I == B); its tokens become the cross-attention
/// memory and the text passes unchanged.
class CrossAttentionDecoderFusionImpl final : public DecoderFusionModule {
 public:
  CrossAttentionDecoderFusionImpl() : DecoderFusionModule("vlmkit::CrossAttentionDecoderFusion") {}
  DecoderInputs fuse(const torch::Tensor& text_embeds, const torch::Tensor& token_ids,
                     const torch::Tensor& padding_mask, const torch::Tensor& memory,
                     const torch::Tensor& memory_mask, const torch::Tensor& labels) override;
  DecoderFusionType type() const override { return DecoderFusionType::cross_attention; }
};
TORCH_MODULE(CrossAttentionDecoderFusion);

}  // namespace vlmkit
