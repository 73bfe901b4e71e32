// The Two-Leg fusion blocks and their registry (fusion/two_leg_fusion.h).
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <map>

#include <numeric>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/detail/autocast.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
FusionRegistry& fusion_registry() {
  static FusionRegistry registry("fusion type");
  return registry;
}

VLMKIT_REGISTER_FUSION(ConcatMlpFusionImpl, "ConcatMlpFusion", "concat(pooled image, pooled text) -> MLP -> [B, dim]")
VLMKIT_REGISTER_FUSION(AttentionFusionImpl, "AttentionFusion", "softmax-weighted sum over modalities -> [B, dim]")
VLMKIT_REGISTER_FUSION(GatedFusionImpl, "GatedFusion", "gated multimodal unit (Arevalo et al. 2017) -> [B, dim]")
VLMKIT_REGISTER_FUSION(CrossAttentionFusionImpl, "CrossAttentionFusion",
                       "text tokens cross-attend to image tokens, masked mean -> [B, dim]")

ConcatMlpFusionImpl::ConcatMlpFusionImpl(ConcatMlpFusionOptions options_)
    : FusionModule("vlmkit::ConcatMlpFusion"), options(std::move(options_)) {
  reset();
}

void ConcatMlpFusionImpl::reset() {
  TORCH_CHECK_VALUE(options.image_dim() > 0 && options.text_dim() > 0 && options.dim() > 0,
                    "ConcatMlpFusion: widths must be positive");
  const int64_t hidden = options.hidden_dim() > 0 ? options.hidden_dim() : options.dim();
  fc1 = register_module("fc1", Linear(options.image_dim() + options.text_dim(), hidden));
  fc2 = register_module("fc2", Linear(hidden, options.dim()));
  dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
  detail::init_fan_in_weights(*this);
}

void ConcatMlpFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::ConcatMlpFusion", options_to_json(options));
}

torch::Tensor ConcatMlpFusionImpl::forward(const EncoderOutput& image, const EncoderOutput& text) {
  detail::check_pooled(image, options.image_dim(), "ConcatMlpFusion", "image");
  detail::check_pooled(text, options.text_dim(), "ConcatMlpFusion", "text");
  auto x = torch::cat({image.pooled, text.pooled}, 1);
  return fc2->forward(dropout->forward(torch::gelu(fc1->forward(x))));
}

AttentionFusionImpl::AttentionFusionImpl(AttentionFusionOptions options_)
    : FusionModule("vlmkit::AttentionFusion"), options(std::move(options_)) {
  reset();
}

void AttentionFusionImpl::reset() {
  TORCH_CHECK_VALUE(options.image_dim() > 0 && options.text_dim() > 0 && options.dim() > 0,
                    "AttentionFusion: widths must be positive");
  const int64_t hidden = options.hidden_dim() > 0 ? options.hidden_dim() : options.dim();
  image_proj = register_module("image_proj", Linear(options.image_dim(), options.dim()));
  text_proj = register_module("text_proj", Linear(options.text_dim(), options.dim()));
  score_hidden = register_module("score_hidden", Linear(options.dim(), hidden));
  score_out = register_module(
      "score_out", Linear(torch::nn::LinearOptions(hidden, 1).bias(false)));
  detail::init_fan_in_weights(*this);
}

void AttentionFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::AttentionFusion", options_to_json(options));
}

torch::Tensor AttentionFusionImpl::forward(const EncoderOutput& image, const EncoderOutput& text) {
  detail::check_pooled(image, options.image_dim(), "AttentionFusion", "image");
  detail::check_pooled(text, options.text_dim(), "AttentionFusion", "text");
  auto h = torch::stack({image_proj->forward(image.pooled), text_proj->forward(text.pooled)}, 1);  // [B, 2, D]
  auto weights = score_out->forward(torch::tanh(score_hidden->forward(h))).softmax(1);  // [B, 2, 1]
  last_weights_ = weights.squeeze(-1).detach();
  return (weights * h).sum(1);
}

GatedFusionImpl::GatedFusionImpl(GatedFusionOptions options_)
    : FusionModule("vlmkit::GatedFusion"), options(std::move(options_)) {
  reset();
}

void GatedFusionImpl::reset() {
  TORCH_CHECK_VALUE(options.image_dim() > 0 && options.text_dim() > 0 && options.dim() > 0,
                    "GatedFusion: widths must be positive");
  image_proj = register_module("image_proj", Linear(options.image_dim(), options.dim()));
  text_proj = register_module("text_proj", Linear(options.text_dim(), options.dim()));
  gate = register_module("gate", Linear(options.image_dim() + options.text_dim(), options.dim()));
  detail::init_fan_in_weights(*this);
}

void GatedFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::GatedFusion", options_to_json(options));
}

torch::Tensor GatedFusionImpl::forward(const EncoderOutput& image, const EncoderOutput& text) {
  detail::check_pooled(image, options.image_dim(), "GatedFusion", "image");
  detail::check_pooled(text, options.text_dim(), "GatedFusion", "text");
  auto z = torch::sigmoid(gate->forward(torch::cat({image.pooled, text.pooled}, 1)));
  return z * torch::tanh(image_proj->forward(image.pooled)) +
         (1 - z) * torch::tanh(text_proj->forward(text.pooled));
}

CrossAttentionFusionImpl::CrossAttentionFusionImpl(CrossAttentionFusionOptions options_)
    : FusionModule("vlmkit::CrossAttentionFusion"), options(std::move(options_)) {
  reset();
}

void CrossAttentionFusionImpl::reset() {
  detail::check_heads(options.dim(), options.num_heads(), "CrossAttentionFusion");
  TORCH_CHECK_VALUE(options.num_layers() >= 1, "CrossAttentionFusion: num_layers must be >= 1, got ",
                    options.num_layers());
  if (options.text_dim() != options.dim())
    text_proj = register_module("text_proj", Linear(options.text_dim(), options.dim()));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.num_layers(); ++i)
    blocks->push_back(TransformerBlock(TransformerBlockOptions(options.dim(), options.num_heads())
                                           .mlp_ratio(options.mlp_ratio())
                                           .dropout(options.dropout())
                                           .cross_attention(true)
                                           .context_dim(options.image_dim())));
  norm = register_module("norm", Norm(options.dim()));
  detail::init_transformer_weights(*this);
}

void CrossAttentionFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::CrossAttentionFusion", options_to_json(options));
}

torch::Tensor CrossAttentionFusionImpl::forward(const EncoderOutput& image,
                                                const EncoderOutput& text) {
  detail::check_tokens(image, options.image_dim(), "CrossAttentionFusion", "image");
  detail::check_tokens(text, options.text_dim(), "CrossAttentionFusion", "text");
  TORCH_CHECK_VALUE(image.tokens.size(0) == text.tokens.size(0),
                    "CrossAttentionFusion: expected the same batch size for image and text, got ",
                    image.tokens.size(0), " and ", text.tokens.size(0));
  auto x = text_proj ? text_proj->forward(text.tokens) : text.tokens;
  for (const auto& block : *blocks)
    x = block->as<TransformerBlockImpl>()->forward(x, text.padding_mask, {}, false, image.tokens,
                                                   image.padding_mask);
  return detail::masked_mean(norm->forward(x), text.padding_mask);
}
}  // namespace vlmkit
