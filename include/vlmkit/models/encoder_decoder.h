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
    check_generative_slots(projector_->output_dim(), options.fusion(), *decoder_, "EncoderDecoder");
    image_encoder = register_module("image_encoder", std::move(image_encoder_));
    projector = register_module("projector", std::move(projector_));
    fusion = register_module("fusion", std::move(fusion_));
    decoder = register_module("decoder", std::move(decoder_));
  }

  /// images [I, C, H, W] -> projected image tokens [I, M, D].
  torch::Tensor encode_images(const torch::Tensor& images) {
    return projector->forward(image_encoder->forward(images));
  }

  /// Fuses images into the token sequence. Concat: images are assigned to the
  /// <image> placeholders in reading order across the batch. Cross-attention:
  /// one image per sample.
  DecoderInputs prepare(const torch::Tensor& images, const torch::Tensor& input_ids,
                        const torch::Tensor& padding_mask = {}, const torch::Tensor& labels = {}) {
    auto mask = check_decoder_ids(input_ids, padding_mask, *decoder, "EncoderDecoder");
    check_labels(labels, input_ids, *decoder, "EncoderDecoder");
    auto memory = encode_images(images);
    return fusion->fuse(decoder->embed(input_ids), input_ids, mask, memory, {}, labels);
  }

  /// labels [B, T]: the target token at each position, kIgnoreIndex on the
  /// prompt; logits at t predict labels[t + 1].
  DecoderOutput forward(const torch::Tensor& images, const torch::Tensor& input_ids,
                        const torch::Tensor& padding_mask = {}, const torch::Tensor& labels = {}) {
    return decode_fused(*decoder, prepare(images, input_ids, padding_mask, labels),
                        options.attention(), options.label_smoothing(), options.loss_reduction());
  }

  /// Generates continuations of prompts (token lists of any lengths).
  GenerationOutput generate(const torch::Tensor& images,
                            const std::vector<std::vector<int64_t>>& prompts,
                            const GenerationOptions& generation = {},
                            const ConstraintFactory& constraint = nullptr,
                            const TokenCallback& callback = nullptr) {
    auto [ids, mask] = pad_token_lists(prompts, decoder->options.pad_id());
    ids = ids.to(images.device());
    mask = mask.to(images.device());
    return generate_from_inputs(*decoder, prepare(images, ids, mask), options.attention(),
                                generation, constraint, callback);
  }

  json config() const {
    json out = options_to_json(options);
    out["architecture"] = "encoder_decoder";
    out["image_encoder"] = image_encoder->config();
    out["projector"] = projector->config();
    out["fusion"] = to_name(options.fusion());
    out["decoder"] = decoder->config();
    return out;
  }

  GenerativeOptions options;
  std::shared_ptr<ImageEncoder> image_encoder;
  std::shared_ptr<Projector> projector;
  std::shared_ptr<Fusion> fusion;
  std::shared_ptr<Decoder> decoder;
};

extern template class EncoderDecoderImpl<ImageEncoderModule, ProjectorModule, DecoderFusionModule,
                                         TextDecoderImpl>;
TORCH_MODULE_IMPL(EncoderDecoder, EncoderDecoderImpl<>);

}  // namespace vlmkit
