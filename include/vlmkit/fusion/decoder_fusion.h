#pragma once
/// Fusion of projected image tokens into the text decoder: `concat` splices
/// them into the token sequence at the <image> placeholders; `cross_attention`
/// hands them to the decoder's cross-attention layers.
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>

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
  /// [B, N] bool (true = padding), or [B, L, N] (true = blocked) for packed
  /// rows, where each example sees only its own image; or undefined.
  torch::Tensor context_mask;
  /// Packed rows (sequence packing): [B, L] int64, the example of each
  /// position within its row (0, 1, ...; -1 at padding); undefined otherwise.
  /// Each example attends only to itself, its positions restart at 0 and its
  /// first label is ignored (it does not continue the previous example).
  torch::Tensor segment_ids;
};

/// Positions 0, 1, ... counting only non-padding tokens (pads get 0).
torch::Tensor positions_from_mask(const torch::Tensor& padding_mask);

/// Packed rows: positions 0, 1, ... restarting at each example (segment_ids
/// [B, L]), counting only non-padding tokens.
torch::Tensor positions_from_segments(const torch::Tensor& padding_mask, const torch::Tensor& segment_ids);

/// Validates packed-row segment ids against token ids [B, T] (int64, same
/// shape; along each row the non-padding positions start at example 0 and
/// step by 0 or 1) and returns them with padding set to -1; undefined stays
/// undefined. `who` names the caller in errors.
torch::Tensor check_segment_ids(const torch::Tensor& segment_ids, const torch::Tensor& ids,
                                const torch::Tensor& padding_mask, const char* who);

/// The decoder-fusion slot contract.
///   text_embeds [B, T, D], token_ids [B, T], padding_mask [B, T],
///   memory [I, M, D] (I images, M tokens each), memory_mask [I, M] or
///   undefined, labels [B, T] or undefined, segment_ids [B, T] (packed rows,
///   checked by check_segment_ids) or undefined. A fusion that receives
///   segment_ids returns them for its output positions, with positions from
///   positions_from_segments and every example's own images only.
class DecoderFusionModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  virtual DecoderInputs fuse(const torch::Tensor& text_embeds, const torch::Tensor& token_ids,
                             const torch::Tensor& padding_mask, const torch::Tensor& memory,
                             const torch::Tensor& memory_mask, const torch::Tensor& labels,
                             const torch::Tensor& segment_ids) = 0;
  virtual DecoderFusionType type() const = 0;
  /// The width the projector must output for this fusion into `decoder`.
  virtual int64_t memory_width(const TextDecoderOptions& decoder) const = 0;
  /// The decoder's cross_attention_every when its config leaves it out.
  virtual int64_t default_cross_attention_every() const = 0;
  /// Raises ValueError unless a projector of `projector_dim` and `decoder`
  /// fit this fusion; `who` names the architecture.
  virtual void check_slots(int64_t projector_dim, const TextDecoderOptions& decoder, const char* who) const = 0;
  /// Architectures with one image per example (EncoderTextDecoder): raises
  /// ValueError unless the token ids fit that (concat: one placeholder each).
  virtual void check_one_image_per_example(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                                           const torch::Tensor& segment_ids, const char* who) const = 0;
  /// The config's "fusion" value.
  nlohmann::json config() const { return to_name(type()); }
};

/// The decoder-fusion slot's one switch: the block for `type` (concat reads
/// image_token_id). Every other choice lives in the blocks' virtuals.
std::shared_ptr<DecoderFusionModule> make_decoder_fusion(DecoderFusionType type, int64_t image_token_id);

/// Each <image> placeholder (image_token_id) is replaced by the M tokens of
/// the next image, in order, so a sample may hold several images; the number
/// of placeholders must equal the number of images. Labels at image
/// positions become kIgnoreIndex. Output is right-padded. Packed rows: image
/// tokens belong to the example of their placeholder.
class ConcatFusionImpl final : public DecoderFusionModule {
 public:
  explicit ConcatFusionImpl(int64_t image_token_id = 3)
      : DecoderFusionModule("vlmkit::ConcatFusion"), image_token_id(image_token_id) {}
  DecoderInputs fuse(const torch::Tensor& text_embeds, const torch::Tensor& token_ids,
                     const torch::Tensor& padding_mask, const torch::Tensor& memory,
                     const torch::Tensor& memory_mask, const torch::Tensor& labels,
                     const torch::Tensor& segment_ids) override;
  DecoderFusionType type() const override { return DecoderFusionType::concat; }
  /// The image tokens join the decoder's own sequence: d_model.
  int64_t memory_width(const TextDecoderOptions& decoder) const override { return decoder.d_model(); }
  int64_t default_cross_attention_every() const override { return 0; }
  void check_slots(int64_t projector_dim, const TextDecoderOptions& decoder, const char* who) const override;
  void check_one_image_per_example(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                                   const torch::Tensor& segment_ids, const char* who) const override;
  int64_t image_token_id;
};
TORCH_MODULE(ConcatFusion);

/// One image per sample (I == B); its tokens become the cross-attention
/// memory and the text passes unchanged. Packed rows: one image per example
/// (I == the number of examples, in row order); a row's memory is its
/// examples' images side by side, each example seeing only its own.
class CrossAttentionDecoderFusionImpl final : public DecoderFusionModule {
 public:
  CrossAttentionDecoderFusionImpl() : DecoderFusionModule("vlmkit::CrossAttentionDecoderFusion") {}
  DecoderInputs fuse(const torch::Tensor& text_embeds, const torch::Tensor& token_ids,
                     const torch::Tensor& padding_mask, const torch::Tensor& memory,
                     const torch::Tensor& memory_mask, const torch::Tensor& labels,
                     const torch::Tensor& segment_ids) override;
  DecoderFusionType type() const override { return DecoderFusionType::cross_attention; }
  /// The decoder's cross-attention width: context_dim, or d_model when 0.
  int64_t memory_width(const TextDecoderOptions& decoder) const override {
    return decoder.context_dim() > 0 ? decoder.context_dim() : decoder.d_model();
  }
  /// Cross-attention in every layer.
  int64_t default_cross_attention_every() const override { return 1; }
  void check_slots(int64_t projector_dim, const TextDecoderOptions& decoder, const char* who) const override;
  /// One image per sample is checked by fuse (images == samples).
  void check_one_image_per_example(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                   const char*) const override {}
};
TORCH_MODULE(CrossAttentionDecoderFusion);

}  // namespace vlmkit
