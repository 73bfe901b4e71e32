#pragma once
/// Architecture 4, encoder-decoder (LLaVA / Flamingo family): image encoder,
/// projector, then concatenation or cross-attention into a text decoder that
/// predicts the next token.
#include <torch/nn/pimpl.h>

#include "vlmkit/models/generative.h"
#include "vlmkit/modules/encoder.h"
#include "vlmkit/options/decoder.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

/// Template slots: ImageEncoder, Projector, Fusion (decoder fusion) and
/// Decoder. `EncoderDecoderImpl<>` holds the slot base classes and is what
/// build-by-name and Python use.
///
/// Example:
///   auto model = make_encoder_decoder({{"projector", {{"type", "pixel_shuffle"}}},
///                                      {"fusion", "concat"}});
///   auto out = model->forward(images, input_ids, {}, labels);   // out.loss
///   auto gen = model->generate(images, {tokenizer.encode("<image>What colour?")});
template <class ImageEncoder = ImageEncoderModule, class Projector = ProjectorModule,
          class Fusion = DecoderFusionModule, class Decoder = TextDecoderImpl>
class EncoderDecoderImpl : public torch::nn::Module {
 public:
  EncoderDecoderImpl(std::shared_ptr<ImageEncoder> image_encoder_,
                     std::shared_ptr<Projector> projector_, std::shared_ptr<Fusion> fusion_,
                     std::shared_ptr<Decoder> decoder_, GenerativeOptions options_ = {})
      : torch::nn::Module("vlmkit::EncoderDecoder"), options(std::move(options_)) {
    TORCH_CHECK_VALUE(image_encoder_ && projector_ && fusion_ && decoder_,
                      "EncoderDecoder: image_encoder, projector, fusion and decoder are required");
    options.fusion(fusion_->type());
    fusion_->check_slots(projector_->output_dim(), decoder_->options, "EncoderDecoder");
    // A grid every factor divides: {0, 0} back means the tokens lie on none.
    check_image_positions(options.image_positions(), projector_->output_grid(1024, 1024), projector_->output_dim(),
                          "EncoderDecoder");
    if (options.image_positions() == ImagePositions::gated_sincos2d)
      image_position_gate = register_parameter("image_position_gate", torch::zeros({projector_->output_dim()}));
    image_encoder = register_module("image_encoder", std::move(image_encoder_));
    projector = register_module("projector", std::move(projector_));
    fusion = register_module("fusion", std::move(fusion_));
    decoder = register_module("decoder", std::move(decoder_));
  }

  /// images [I, C, H, W] -> projected image tokens [I, M, D] (with their
  /// grid positions under options.image_positions).
  torch::Tensor encode_images(const torch::Tensor& images) {
    auto encoded = image_encoder->forward(images);
    return with_positions(projector->forward(encoded), encoded);
  }

  /// Variable-size images (dynamic resolution): images zero-padded into one
  /// [I, C, H, W] batch, image_sizes [I, 2] their (height, width) (see
  /// data::collate_images). Returns the projected tokens [I, M, D] and their
  /// padding mask [I, M] (undefined when nothing is padded).
  std::pair<torch::Tensor, torch::Tensor> encode_images(const torch::Tensor& images,
                                                        const torch::Tensor& image_sizes) {
    auto encoded = image_encoder->forward(images, image_sizes);
    return {with_positions(projector->forward(encoded), encoded), projector->output_padding_mask(encoded)};
  }

  /// Fuses images into the token sequence. Concat: images are assigned to the
  /// <image> placeholders in reading order across the batch (with
  /// image_sizes, each contributes only its valid tokens). Cross-attention:
  /// one image per sample (padded tokens masked). segment_ids [B, T]: packed
  /// rows (several examples per row, see DecoderInputs::segment_ids); with
  /// cross-attention one image per example, in row order.
  DecoderInputs prepare(const torch::Tensor& images, const torch::Tensor& input_ids,
                        const torch::Tensor& padding_mask = {}, const torch::Tensor& labels = {},
                        const torch::Tensor& image_sizes = {}, const torch::Tensor& segment_ids = {}) {
    auto mask = check_decoder_ids(input_ids, padding_mask, *decoder, "EncoderDecoder");
    check_labels(labels, input_ids, *decoder, "EncoderDecoder");
    auto segments = check_segment_ids(segment_ids, input_ids, mask, "EncoderDecoder");
    auto [memory, memory_mask] = encode_images(images, image_sizes);
    return fusion->fuse(decoder->embed(input_ids), input_ids, mask, memory, memory_mask, labels, segments);
  }

  /// labels [B, T]: the target token at each position, kIgnoreIndex on the
  /// prompt; logits at t predict labels[t + 1]. image_sizes: see encode_images.
  /// segment_ids: packed rows (the Loader's pack_to); loss and gradients
  /// equal those of the same examples one per row.
  DecoderOutput forward(const torch::Tensor& images, const torch::Tensor& input_ids,
                        const torch::Tensor& padding_mask = {}, const torch::Tensor& labels = {},
                        const torch::Tensor& image_sizes = {}, const torch::Tensor& segment_ids = {}) {
    return decode_fused(*decoder, prepare(images, input_ids, padding_mask, labels, image_sizes, segment_ids),
                        options.attention(), options.label_smoothing(), options.loss_reduction());
  }

  /// Generates continuations of prompts (token lists of any lengths).
  GenerationOutput generate(const torch::Tensor& images,
                            const std::vector<std::vector<int64_t>>& prompts,
                            const GenerationOptions& generation = {},
                            const ConstraintFactory& constraint = nullptr,
                            const TokenCallback& callback = nullptr,
                            const torch::Tensor& image_sizes = {}) {
    auto [ids, mask] = pad_token_lists(prompts, decoder->options.pad_id());
    ids = ids.to(images.device());
    mask = mask.to(images.device());
    return generate_from_inputs(*decoder, prepare(images, ids, mask, {}, image_sizes), options.attention(),
                                generation, constraint, callback);
  }

  json config() const {
    json out = options_to_json(options);
    out["architecture"] = "encoder_decoder";
    out["image_encoder"] = image_encoder->config();
    out["projector"] = projector->config();
    out["fusion"] = fusion->config();
    out["decoder"] = decoder->config();
    return out;
  }

  GenerativeOptions options;
  std::shared_ptr<ImageEncoder> image_encoder;
  std::shared_ptr<Projector> projector;
  std::shared_ptr<Fusion> fusion;
  std::shared_ptr<Decoder> decoder;
  torch::Tensor image_position_gate;  // [D], gated_sincos2d only

 private:
  // Padded batches of variable-size images: positions on the batch's grid,
  // whose top-left cells are each image's own.
  torch::Tensor with_positions(const torch::Tensor& tokens, const EncoderOutput& encoded) const {
    if (options.image_positions() == ImagePositions::none) return tokens;
    const auto grid = detail::token_grid(encoded, "EncoderDecoder");
    return add_image_positions(options.image_positions(), tokens, projector->output_grid(grid[0], grid[1]),
                               image_position_gate, "EncoderDecoder");
  }
};

extern template class EncoderDecoderImpl<ImageEncoderModule, ProjectorModule, DecoderFusionModule,
                                         TextDecoderImpl>;
TORCH_MODULE_IMPL(EncoderDecoder, EncoderDecoderImpl<>);

}  // namespace vlmkit
