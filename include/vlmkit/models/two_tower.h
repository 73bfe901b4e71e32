#pragma once
/// Architecture 1, Two-Tower: an image tower and a text tower trained under a
/// contrastive objective into one embedding space (CLIP / SigLIP).
#include <torch/nn/functional/normalization.h>
#include <torch/nn/init.h>
#include <torch/nn/pimpl.h>

#include "vlmkit/config.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/encoder.h"
#include "vlmkit/modules/linear.h"
#include "vlmkit/options/models.h"

namespace vlmkit {

struct TwoTowerOutput {
  torch::Tensor image_embeds;      // [B, E], L2-normalised
  torch::Tensor text_embeds;       // [B, E], L2-normalised
  torch::Tensor logits_per_image;  // [B, B]
  torch::Tensor logits_per_text;   // [B, B]
  torch::Tensor loss;              // scalar
};

/// Template slots: any ImageEncoder and TextEncoder with the encoder contract
/// (modules/encoder.h). `TwoTowerImpl<>` holds them through their base
/// classes; that instantiation is compiled once in src/ and is what
/// `build_model` and Python use.
///
/// Example (composed at compile time):
///   auto model = std::make_shared<TwoTowerImpl<ViTImpl, TextEncoderImpl>>(
///       std::make_shared<ViTImpl>(), std::make_shared<TextEncoderImpl>(), TwoTowerOptions());
///   auto out = model->forward(images, token_ids);  // out.loss
template <class ImageEncoder = ImageEncoderModule, class TextEncoder = TextEncoderModule>
class TwoTowerImpl : public torch::nn::Module {
 public:
  TwoTowerImpl(std::shared_ptr<ImageEncoder> image_encoder_,
               std::shared_ptr<TextEncoder> text_encoder_, TwoTowerOptions options_ = {})
      : torch::nn::Module("vlmkit::TwoTower"), options(std::move(options_)) {
    TORCH_CHECK_VALUE(image_encoder_ && text_encoder_, "TwoTower: both encoders are required");
    TORCH_CHECK_VALUE(options.embed_dim() > 0, "TwoTower: embed_dim must be positive, got ",
                      options.embed_dim());
    TORCH_CHECK_VALUE(options.max_logit_scale() > 0,
                      "TwoTower: max_logit_scale must be positive, got ",
                      options.max_logit_scale());
    image_encoder = register_module("image_encoder", std::move(image_encoder_));
    text_encoder = register_module("text_encoder", std::move(text_encoder_));
    image_projection = register_module(
        "image_projection",
        Linear(torch::nn::LinearOptions(image_encoder->output_dim(), options.embed_dim()).bias(false)));
    text_projection = register_module(
        "text_projection",
        Linear(torch::nn::LinearOptions(text_encoder->output_dim(), options.embed_dim()).bias(false)));
    torch::NoGradGuard no_grad;
    torch::nn::init::normal_(image_projection->weight, 0.0,
                             std::pow(double(image_encoder->output_dim()), -0.5));
    torch::nn::init::normal_(text_projection->weight, 0.0,
                             std::pow(double(text_encoder->output_dim()), -0.5));
    const auto& objective = contrastive_loss_table().at(options.loss(), "loss");
    loss_fn_ = objective.loss;
    logit_scale_log =
        register_parameter("logit_scale", torch::full({}, options.logit_scale_init()));
    if (objective.learned_bias)
      logit_bias = register_parameter("logit_bias", torch::full({}, options.logit_bias_init()));
  }

  /// images [B, C, H, W] -> [B, E] unit vectors. image_sizes [B, 2]:
  /// variable-size images zero-padded into the batch (the ViT masks padding).
  torch::Tensor encode_image(const torch::Tensor& images, const torch::Tensor& image_sizes = {}) {
    auto pooled = image_encoder->forward(images, image_sizes).pooled;
    return torch::nn::functional::normalize(
        image_projection->forward(pooled),
        torch::nn::functional::NormalizeFuncOptions().dim(-1));
  }

  /// token_ids [B, T] (+ padding_mask [B, T], true = padding) -> [B, E].
  torch::Tensor encode_text(const torch::Tensor& token_ids,
                            const torch::Tensor& padding_mask = {}) {
    auto pooled = text_encoder->forward(token_ids, padding_mask).pooled;
    return torch::nn::functional::normalize(
        text_projection->forward(pooled), torch::nn::functional::NormalizeFuncOptions().dim(-1));
  }

  /// exp(logit_scale) clamped to max_logit_scale, as CLIP does.
  torch::Tensor scale() const {
    return logit_scale_log.exp().clamp_max(options.max_logit_scale());
  }

  /// Scaled (and for SigLIP biased) similarities [B_img, B_txt].
  torch::Tensor similarity(const torch::Tensor& image_embeds, const torch::Tensor& text_embeds) const {
    auto logits = scale() * torch::matmul(image_embeds, text_embeds.t());
    if (logit_bias.defined()) logits = logits + logit_bias;
    return logits;
  }

  /// Matching pairs share an index: images[i] goes with token_ids[i].
  TwoTowerOutput forward(const torch::Tensor& images, const torch::Tensor& token_ids,
                         const torch::Tensor& padding_mask = {}, const torch::Tensor& image_sizes = {}) {
    TORCH_CHECK_VALUE(images.dim() >= 1 && token_ids.dim() >= 1 &&
                          images.size(0) == token_ids.size(0),
                      "TwoTower: expected as many texts as images, got ",
                      images.dim() ? images.size(0) : 0, " images and ",
                      token_ids.dim() ? token_ids.size(0) : 0, " texts");
    TwoTowerOutput out;
    out.image_embeds = encode_image(images, image_sizes);
    out.text_embeds = encode_text(token_ids, padding_mask);
    out.logits_per_image = similarity(out.image_embeds, out.text_embeds);
    out.logits_per_text = out.logits_per_image.t();
    out.loss = loss_fn_(out.logits_per_image);
    return out;
  }

  /// Zero-shot classification: probabilities [B, P] of each image over P
  /// prompts (softmax of the similarities).
  torch::Tensor zero_shot(const torch::Tensor& images, const torch::Tensor& prompt_ids,
                          const torch::Tensor& prompt_padding_mask = {}, const torch::Tensor& image_sizes = {}) {
    auto logits = similarity(encode_image(images, image_sizes), encode_text(prompt_ids, prompt_padding_mask));
    return logits.softmax(-1);
  }

  json config() const {
    json out = options_to_json(options);
    out["architecture"] = "two_tower";
    out["image_encoder"] = image_encoder->config();
    out["text_encoder"] = text_encoder->config();
    return out;
  }

  TwoTowerOptions options;
  std::shared_ptr<ImageEncoder> image_encoder;
  std::shared_ptr<TextEncoder> text_encoder;
  Linear image_projection{nullptr}, text_projection{nullptr};
  torch::Tensor logit_scale_log;  // registered as "logit_scale" (CLIP's name)
  torch::Tensor logit_bias;       // a loss with a learned bias only (SigLIP)

 private:
  std::function<torch::Tensor(const torch::Tensor&)> loss_fn_;  // the objective's row
};

extern template class TwoTowerImpl<ImageEncoderModule, TextEncoderModule>;

/// Holder for the by-name (runtime-composed) Two-Tower.
TORCH_MODULE_IMPL(TwoTower, TwoTowerImpl<>);

}  // namespace vlmkit
