// The causal text decoder and its KV cache (modules/text_decoder.h).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <map>
#include <regex>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/generate/boxes.h"
#include "vlmkit/generate/json_schema.h"
#include "vlmkit/models/generative.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
using detail::shape_str;

void DecoderCache::select(const torch::Tensor& index) {
  for (auto& layer : layers) {
    layer.self.select(index);
    layer.cross.select(index);
  }
  if (padding_mask.defined()) padding_mask = padding_mask.index_select(0, index);
}

TextDecoderImpl::TextDecoderImpl(TextDecoderOptions options_) : options(std::move(options_)) {
  reset();
}

void TextDecoderImpl::reset() {
  const int64_t d = options.d_model();
  TORCH_CHECK_VALUE(d > 0 && options.num_heads() > 0 && d % options.num_heads() == 0,
                    "TextDecoder: width ", d, " must be divisible by num_heads ", options.num_heads());
  TORCH_CHECK_VALUE(options.vocab_size() > 0 && options.max_len() > 0,
                    "TextDecoder: vocab_size and max_len must be positive");
  TORCH_CHECK_VALUE(options.depth() >= 1, "TextDecoder: depth must be >= 1, got ", options.depth());
  TORCH_CHECK_VALUE(options.cross_attention_every() >= 0,
                    "TextDecoder: cross_attention_every must be >= 0, got ",
                    options.cross_attention_every());
  TORCH_CHECK_VALUE(options.pad_id() >= 0 && options.pad_id() < options.vocab_size(),
                    "TextDecoder: pad_id must be in [0, vocab_size)");
  const bool rotary = options.pos_embedding() == DecoderPosition::rotary;
  TORCH_CHECK_VALUE(!rotary || (d / options.num_heads()) % 2 == 0,
                    "TextDecoder: rotary positions need an even head width, got ",
                    d / options.num_heads());
  token_embed = register_module("token_embed", torch::nn::Embedding(options.vocab_size(), d));
  if (!rotary) pos_embed = register_parameter("pos_embed", torch::randn({1, options.max_len(), d}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  const int64_t every = options.cross_attention_every();
  for (int64_t i = 0; i < options.depth(); ++i) {
    const bool cross = every > 0 && (i + 1) % every == 0;
    blocks->push_back(TransformerBlock(TransformerBlockOptions(d, options.num_heads())
                                           .mlp_ratio(options.mlp_ratio())
                                           .dropout(options.dropout())
                                           .cross_attention(cross)
                                           .context_dim(options.context_dim())
                                           .gated_cross_attention(options.gated_cross_attention())
                                           .rotary(rotary)
                                           .rope_theta(options.rope_theta())
                                           .norm(options.norm())
                                           .norm_eps(options.norm_eps())
                                           .mlp(options.mlp())
                                           .num_kv_heads(options.num_kv_heads())
                                           .qk_norm(options.qk_norm())));
  }
  norm = register_module("norm", Norm(d, options.norm(), options.norm_eps()));
  if (!options.tie_embeddings())
    lm_head = register_module("lm_head", Linear(torch::nn::LinearOptions(d, options.vocab_size()).bias(false)));
  detail::init_transformer_weights(*this);
}

void TextDecoderImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::TextDecoder", options_to_json(options));
}

json TextDecoderImpl::config() const { return options_to_json(options); }

DecoderCache TextDecoderImpl::make_cache() const {
  DecoderCache cache;
  cache.layers.resize(blocks->size());
  return cache;
}

torch::Tensor TextDecoderImpl::embed(const torch::Tensor& token_ids) {
  TORCH_CHECK_TYPE(token_ids.scalar_type() == torch::kLong,
                   "TextDecoder: expected token ids of dtype int64, got ", token_ids.scalar_type());
  if (token_ids.numel() > 0) {
    const int64_t lo = token_ids.min().item<int64_t>(), hi = token_ids.max().item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < options.vocab_size(), "TextDecoder: token ids must be in [0, ",
                      options.vocab_size(), "), got values in [", lo, ", ", hi, "]");
  }
  return token_embed->forward(token_ids);
}

torch::Tensor TextDecoderImpl::forward(const torch::Tensor& embeds, const torch::Tensor& padding_mask,
                                       const torch::Tensor& positions, const torch::Tensor& attn_mask,
                                       const torch::Tensor& context, const torch::Tensor& context_mask,
                                       DecoderCache* cache) {
  const int64_t d = options.d_model();
  TORCH_CHECK_VALUE(embeds.defined() && embeds.dim() == 3 && embeds.size(2) == d,
                    "TextDecoder: expected embeddings of shape [B, T, ", d, "], got ", shape_str(embeds));
  const int64_t b = embeds.size(0), t = embeds.size(1);
  const int64_t past = cache ? cache->length() : 0;
  TORCH_CHECK_VALUE(past + t <= options.max_len(), "TextDecoder: sequence of ", past + t,
                    " positions exceeds the context length max_len=", options.max_len());
  TORCH_CHECK_VALUE(!has_cross_attention() || context.defined(),
                    "TextDecoder: this decoder has cross-attention layers and needs a context");
  auto pos = positions;
  if (!pos.defined())
    pos = torch::arange(past, past + t, torch::TensorOptions().dtype(torch::kLong).device(embeds.device()))
              .unsqueeze(0)
              .expand({b, t});
  auto mask = padding_mask.defined() ? padding_mask
                                     : torch::zeros({b, t}, torch::TensorOptions().dtype(torch::kBool).device(embeds.device()));
  if (cache) {
    if (cache->layers.empty()) cache->layers.resize(blocks->size());
    cache->padding_mask = cache->padding_mask.defined() ? torch::cat({cache->padding_mask, mask}, 1) : mask;
    mask = cache->padding_mask;
  }
  auto x = embeds;
  if (pos_embed.defined()) {
    TORCH_CHECK_VALUE(pos.max().item<int64_t>() < options.max_len(), "TextDecoder: position ",
                      pos.max().item<int64_t>(), " exceeds the context length max_len=", options.max_len());
    x = x + pos_embed[0].index_select(0, pos.reshape(-1)).view({b, t, d});
  }
  bool causal = !attn_mask.defined();
  auto self_mask = attn_mask, key_mask = mask;
  if (!cache) {
    // Without a cache (training, scoring): padding and the causal or policy mask
    // become the attention's additive mask once, in its dtype, for all layers.
    auto dtype = embeds.scalar_type();
    if (embeds.is_cuda() ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled())
      dtype = embeds.is_cuda() ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
    self_mask = detail::attention_bias(mask, attn_mask, causal, t, t, 0, dtype, embeds.device()).view({b, t, t});
    key_mask = torch::Tensor();
    causal = false;
  }
  const bool recompute =
      options.activation_checkpointing() && is_training() && torch::GradMode::is_enabled() && !cache;
  size_t i = 0;
  for (const auto& block : *blocks) {
    auto* layer = block->as<TransformerBlockImpl>();
    const auto layer_context = layer->options.cross_attention() ? context : torch::Tensor();
    if (recompute) {
      x = detail::checkpoint([layer, key_mask, self_mask, causal, context_mask, pos](const torch::Tensor& h,
                                                                                     const torch::Tensor& c) {
        return layer->forward(h, key_mask, self_mask, causal, c, context_mask, nullptr, pos);
      }, x, layer_context);
    } else {
      x = layer->forward(x, key_mask, self_mask, causal, layer_context, context_mask,
                         cache ? &cache->layers[i] : nullptr, pos);
    }
    ++i;
  }
  return norm->forward(x);
}

torch::Tensor TextDecoderImpl::logits(const torch::Tensor& hidden) {
  return lm_head ? lm_head->forward(hidden) : torch::matmul(hidden, token_embed->weight.t());
}
}  // namespace vlmkit
