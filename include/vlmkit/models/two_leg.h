#pragma once
/// Architecture 2, Two-Leg: image and text encoders, a pluggable fusion block
/// merging their features, and a task head (classification or matching).
#include <torch/nn/pimpl.h>

#include "vlmkit/config.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/encoder.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/options/models.h"

namespace vlmkit {

struct TwoLegOutput {
  /// [B, num_classes] for classification; [B] for matching.
  torch::Tensor logits;
  /// [B, fusion dim].
  torch::Tensor fused;
  /// Scalar; undefined when no labels were given.
  torch::Tensor loss;
};

/// Template slots: ImageEncoder, TextEncoder, Fusion (contracts in
/// modules/encoder.h) and Head (modules/heads.h: forward [B, D] -> logits, and
/// its loss).
template <class ImageEncoder = ImageEncoderModule, class TextEncoder = TextEncoderModule,
          class Fusion = FusionModule, class Head = HeadModule>
class TwoLegImpl : public torch::nn::Module {
 public:
  TwoLegImpl(std::shared_ptr<ImageEncoder> image_encoder_,
             std::shared_ptr<TextEncoder> text_encoder_, std::shared_ptr<Fusion> fusion_,
             std::shared_ptr<Head> head_, TwoLegOptions options_ = {})
      : torch::nn::Module("vlmkit::TwoLeg"), options(std::move(options_)) {
    TORCH_CHECK_VALUE(image_encoder_ && text_encoder_ && fusion_ && head_,
                      "TwoLeg: image_encoder, text_encoder, fusion and head are all required");
    TORCH_CHECK_VALUE(head_->input_dim() == fusion_->output_dim(),
                      "TwoLeg: head input width must equal the fusion output width: expected ",
                      fusion_->output_dim(), ", got ", head_->input_dim());
    TORCH_CHECK_VALUE(options.label_smoothing() >= 0.0 && options.label_smoothing() < 1.0,
                      "TwoLeg: label_smoothing must be in [0, 1), got ", options.label_smoothing());
    image_encoder = register_module("image_encoder", std::move(image_encoder_));
    text_encoder = register_module("text_encoder", std::move(text_encoder_));
    fusion = register_module("fusion", std::move(fusion_));
    head = register_module("head", std::move(head_));
  }

  /// labels: [B] int64 class ids (classification) or [B] 0/1 (matching);
  /// undefined to skip the loss. image_sizes [B, 2]: variable-size images
  /// zero-padded into the batch (the ViT masks padding, fusions see the mask).
  TwoLegOutput forward(const torch::Tensor& images, const torch::Tensor& token_ids,
                       const torch::Tensor& padding_mask = {}, const torch::Tensor& labels = {},
                       const torch::Tensor& image_sizes = {}) {
    TORCH_CHECK_VALUE(images.dim() >= 1 && token_ids.dim() >= 1 &&
                          images.size(0) == token_ids.size(0),
                      "TwoLeg: expected as many texts as images, got ",
                      images.dim() ? images.size(0) : 0, " images and ",
                      token_ids.dim() ? token_ids.size(0) : 0, " texts");
    TwoLegOutput out;
    auto image = image_encoder->forward(images, image_sizes);
    auto text = text_encoder->forward(token_ids, padding_mask);
    out.fused = fusion->forward(image, text);
    out.logits = head->forward(out.fused);
    if (labels.defined()) out.loss = head->loss(out.logits, labels, options.label_smoothing());
    return out;
  }

  json config() const {
    json out = options_to_json(options);
    out["architecture"] = "two_leg";
    out["image_encoder"] = image_encoder->config();
    out["text_encoder"] = text_encoder->config();
    out["fusion"] = fusion->config();
    out["head"] = head->config();
    return out;
  }

  TwoLegOptions options;
  std::shared_ptr<ImageEncoder> image_encoder;
  std::shared_ptr<TextEncoder> text_encoder;
  std::shared_ptr<Fusion> fusion;
  std::shared_ptr<Head> head;
};

extern template class TwoLegImpl<ImageEncoderModule, TextEncoderModule, FusionModule, HeadModule>;

/// Holder for the by-name (runtime-composed) Two-Leg.
TORCH_MODULE_IMPL(TwoLeg, TwoLegImpl<>);

}  // namespace vlmkit
