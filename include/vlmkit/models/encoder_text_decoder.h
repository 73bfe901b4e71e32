#pragma once
/// Architecture 3, image encoder + text encoder + text decoder: a conv stage
/// on the image and a text embedding of a context text (a description or a
/// question) are concatenated and encoded together, projected, then joined
/// to the decoder by cross-attention or by concatenation.
#include <torch/nn/pimpl.h>

#include "vlmkit/models/generative.h"
#include "vlmkit/modules/encoder.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"
#include "vlmkit/options/decoder.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

/// Steps (shapes for B samples, N image tokens, C context tokens):
///   1. image encoder (default: conv stage) -> [B, N, Di] -> Linear to Dt when
///      Di != Dt, + fixed 2D sin-cos positions + image modality embedding;
///   2. context text -> token + position embeddings [B, C, Dt] + text modality;
///   3. concatenate [B, N + C, Dt] and encode with the text encoder's blocks
///      (context padding masked);
///   4. image part -> projector -> [B, M, D]; context part -> Linear -> [B, C, D];
///      memory = [B, M + C, D] with the context padding mask;
///   5. fusion into the decoder: concat (one <image> placeholder per sample
///      marks where the memory goes) or cross-attention.
template <class ImageEncoder = ImageEncoderModule, class TextEncoder = TextEncoderImpl,
          class Projector = ProjectorModule, class Fusion = DecoderFusionModule,
          class Decoder = TextDecoderImpl>
class EncoderTextDecoderImpl : public torch::nn::Module {
 public:
  EncoderTextDecoderImpl(std::shared_ptr<ImageEncoder> image_encoder_,
                         std::shared_ptr<TextEncoder> text_encoder_,
                         std::shared_ptr<Projector> projector_, std::shared_ptr<Fusion> fusion_,
                         std::shared_ptr<Decoder> decoder_, GenerativeOptions options_ = {})
      : torch::nn::Module("vlmkit::EncoderTextDecoder"), options(std::move(options_)) {
    TORCH_CHECK_VALUE(image_encoder_ && text_encoder_ && projector_ && fusion_ && decoder_,
                      "EncoderTextDecoder: image_encoder, text_encoder, projector, fusion and "
                      "decoder are required");
    options.fusion(fusion_->type());
    TORCH_CHECK_VALUE(options.image_positions() == ImagePositions::none,
                      "EncoderTextDecoder: image_positions is an encoder_decoder option (here the projector "
                      "reads image and text tokens encoded together, on no image grid); got \"",
                      to_name(options.image_positions()), "\"");
    const int64_t dt = text_encoder_->output_dim();
    TORCH_CHECK_VALUE(projector_->input_dim() == dt,
                      "EncoderTextDecoder: the projector reads the joint encoder's width ", dt,
                      ", got projector in_dim ", projector_->input_dim());
    fusion_->check_slots(projector_->output_dim(), decoder_->options, "EncoderTextDecoder");
    image_encoder = register_module("image_encoder", std::move(image_encoder_));
    text_encoder = register_module("text_encoder", std::move(text_encoder_));
    if (image_encoder->output_dim() != dt)
      image_to_text = register_module("image_to_text",
                                      Linear(image_encoder->output_dim(), dt));
    modality_embed = register_parameter("modality_embed", torch::randn({2, dt}) * 0.02);
    projector = register_module("projector", std::move(projector_));
    context_projection =
        register_module("context_projection", Linear(dt, projector->output_dim()));
    fusion = register_module("fusion", std::move(fusion_));
    decoder = register_module("decoder", std::move(decoder_));
  }

  /// Steps 1-4: memory [B, M + C, D] and its padding mask [B, M + C].
  std::pair<torch::Tensor, torch::Tensor> encode(const torch::Tensor& images,
                                                 const torch::Tensor& context_ids,
                                                 const torch::Tensor& context_mask = {}) {
    auto image = image_encoder->forward(images);
    TORCH_CHECK_VALUE(context_ids.dim() == 2 && context_ids.size(0) == image.tokens.size(0),
                      "EncoderTextDecoder: expected one context text per image (", image.tokens.size(0),
                      "), got context_ids of shape ", context_ids.sizes());
    auto ctx_mask = text_encoder->check_ids(context_ids, context_mask);
    auto img = image_to_text ? image_to_text->forward(image.tokens) : image.tokens;
    img = img + sincos_positions(image.grid, img) + modality_embed[0];
    auto txt = text_encoder->embed(context_ids) + modality_embed[1];
    const int64_t n = img.size(1);
    auto joint_mask = torch::cat({torch::zeros({img.size(0), n}, ctx_mask.options()), ctx_mask}, 1);
    auto joint = text_encoder->encode(torch::cat({img, txt}, 1), joint_mask);
    EncoderOutput image_part;
    image_part.tokens = joint.slice(1, 0, n);
    image_part.grid = image.grid;
    auto projected = projector->forward(image_part);                       // [B, M, D]
    auto context = context_projection->forward(joint.slice(1, n));         // [B, C, D]
    auto memory_mask = torch::cat(
        {torch::zeros({projected.size(0), projected.size(1)}, ctx_mask.options()), ctx_mask}, 1);
    return {torch::cat({projected, context}, 1), memory_mask};
  }

  /// segment_ids [B, T]: packed rows (several examples per row); images and
  /// context_ids then hold one entry per example, in row order.
  DecoderInputs prepare(const torch::Tensor& images, const torch::Tensor& context_ids,
                        const torch::Tensor& input_ids, const torch::Tensor& context_mask = {},
                        const torch::Tensor& padding_mask = {}, const torch::Tensor& labels = {},
                        const torch::Tensor& segment_ids = {}) {
    auto mask = check_decoder_ids(input_ids, padding_mask, *decoder, "EncoderTextDecoder");
    check_labels(labels, input_ids, *decoder, "EncoderTextDecoder");
    auto segments = check_segment_ids(segment_ids, input_ids, mask, "EncoderTextDecoder");
    fusion->check_one_image_per_example(input_ids, mask, segments, "EncoderTextDecoder");
    auto [memory, memory_mask] = encode(images, context_ids, context_mask);
    return fusion->fuse(decoder->embed(input_ids), input_ids, mask, memory, memory_mask, labels, segments);
  }

  DecoderOutput forward(const torch::Tensor& images, const torch::Tensor& context_ids,
                        const torch::Tensor& input_ids, const torch::Tensor& context_mask = {},
                        const torch::Tensor& padding_mask = {}, const torch::Tensor& labels = {},
                        const torch::Tensor& segment_ids = {}) {
    return decode_fused(*decoder,
                        prepare(images, context_ids, input_ids, context_mask, padding_mask, labels, segment_ids),
                        options.attention(), options.label_smoothing(), options.loss_reduction());
  }

  GenerationOutput generate(const torch::Tensor& images, const torch::Tensor& context_ids,
                            const std::vector<std::vector<int64_t>>& prompts,
                            const GenerationOptions& generation = {},
                            const ConstraintFactory& constraint = nullptr,
                            const TokenCallback& callback = nullptr,
                            const torch::Tensor& context_mask = {}) {
    auto [ids, mask] = pad_token_lists(prompts, decoder->options.pad_id());
    ids = ids.to(images.device());
    mask = mask.to(images.device());
    return generate_from_inputs(*decoder, prepare(images, context_ids, ids, context_mask, mask),
                                options.attention(), generation, constraint, callback);
  }

  json config() const {
    json out = options_to_json(options);
    out["architecture"] = "encoder_text_decoder";
    out["image_encoder"] = image_encoder->config();
    out["text_encoder"] = text_encoder->config();
    out["projector"] = projector->config();
    out["fusion"] = fusion->config();
    out["decoder"] = decoder->config();
    return out;
  }

  GenerativeOptions options;
  std::shared_ptr<ImageEncoder> image_encoder;
  std::shared_ptr<TextEncoder> text_encoder;
  Linear image_to_text{nullptr};
  torch::Tensor modality_embed;  // [2, Dt]: image, text
  std::shared_ptr<Projector> projector;
  Linear context_projection{nullptr};
  std::shared_ptr<Fusion> fusion;
  std::shared_ptr<Decoder> decoder;

 private:
  /// Fixed 2D positions for the image tokens (zeros when the encoder reports
  /// no grid or the width is not a multiple of 4).
  static torch::Tensor sincos_positions(const std::array<int64_t, 2>& grid, const torch::Tensor& like) {
    const int64_t d = like.size(2);
    if (grid[0] * grid[1] != like.size(1) || d % 4 != 0)
      return torch::zeros({1, like.size(1), d}, like.options());
    return detail::sincos_2d(grid[0], grid[1], d).to(like.options()).unsqueeze(0);
  }
};

extern template class EncoderTextDecoderImpl<ImageEncoderModule, TextEncoderImpl, ProjectorModule,
                                             DecoderFusionModule, TextDecoderImpl>;
TORCH_MODULE_IMPL(EncoderTextDecoder, EncoderTextDecoderImpl<>);

}  // namespace vlmkit
