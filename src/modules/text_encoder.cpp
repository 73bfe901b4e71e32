// The bidirectional text encoder (modules/text_encoder.h).
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
VLMKIT_REGISTER_TEXT_ENCODER(TextEncoderImpl, "TextEncoder", "Bidirectional transformer text encoder")
TextEncoderImpl::TextEncoderImpl(TextEncoderOptions options_)
    : TextEncoderModule("vlmkit::TextEncoder"), options(std::move(options_)) {
  reset();
}

void TextEncoderImpl::reset() {
  const int64_t d = options.d_model();
  detail::check_heads(d, options.num_heads(), "TextEncoder");
  TORCH_CHECK_VALUE(options.vocab_size() > 0 && options.max_len() > 0,
                    "TextEncoder: vocab_size and max_len must be positive, got ",
                    options.vocab_size(), " and ", options.max_len());
  TORCH_CHECK_VALUE(options.pad_id() >= 0 && options.pad_id() < options.vocab_size(),
                    "TextEncoder: pad_id must be in [0, vocab_size=", options.vocab_size(),
                    "), got ", options.pad_id());
  TORCH_CHECK_VALUE(options.depth() >= 0, "TextEncoder: depth must be >= 0, got ", options.depth());
  token_embed = register_module("token_embed", torch::nn::Embedding(options.vocab_size(), d));
  pos_embed = register_parameter("pos_embed", torch::randn({1, options.max_len(), d}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.depth(); ++i)
    blocks->push_back(TransformerBlock(TransformerBlockOptions(d, options.num_heads())
                                           .mlp_ratio(options.mlp_ratio())
                                           .dropout(options.dropout())
                                           .norm(options.norm())
                                           .mlp(options.mlp())));
  norm = register_module("norm", Norm(d, options.norm()));
  detail::init_transformer_weights(*this);
}

void TextEncoderImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::TextEncoder", options_to_json(options));
}

torch::Tensor TextEncoderImpl::check_ids(const torch::Tensor& token_ids,
                                         const torch::Tensor& padding_mask) const {
  return detail::check_token_ids(token_ids, padding_mask, options.vocab_size(), options.max_len(),
                                 options.pad_id(), "TextEncoder");
}

torch::Tensor TextEncoderImpl::embed(const torch::Tensor& token_ids) {
  return token_embed->forward(token_ids) + pos_embed.slice(1, 0, token_ids.size(1));
}

torch::Tensor TextEncoderImpl::encode(const torch::Tensor& embeds, const torch::Tensor& padding_mask) {
  return norm->forward(
      detail::run_encoder_blocks(blocks, embeds, padding_mask, options.activation_checkpointing() && is_training()));
}

EncoderOutput TextEncoderImpl::forward(const torch::Tensor& token_ids,
                                       const torch::Tensor& padding_mask) {
  auto mask = check_ids(token_ids, padding_mask);
  const int64_t t = token_ids.size(1);
  auto x = encode(embed(token_ids), mask);
  EncoderOutput out;
  out.tokens = x;
  out.padding_mask = mask;
  switch (options.pool()) {
    case TextPool::mean: out.pooled = detail::masked_mean(x, mask); break;
    case TextPool::cls: out.pooled = x.select(1, 0); break;
    case TextPool::last: {
      // Index of the last non-padding position, whatever the padding side.
      auto positions = torch::arange(t, token_ids.options()).unsqueeze(0) *
                       mask.logical_not().to(torch::kLong);
      auto last = positions.argmax(1);  // [B]
      out.pooled = x.gather(1, last.view({-1, 1, 1}).expand({-1, 1, x.size(2)})).squeeze(1);
      break;
    }
  }
  return out;
}
}  // namespace vlmkit
