#pragma once
/// Causal pre-norm transformer text decoder with optional cross-attention
/// layers and a KV cache.
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>

#include "vlmkit/modules/transformer.h"
#include "vlmkit/options/decoder.h"

namespace vlmkit {

/// Per-layer caches plus the padding mask of every cached position.
struct DecoderCache {
  std::vector<BlockCache> layers;
  torch::Tensor padding_mask;  // [B, S] bool, true = padding
  int64_t length() const { return layers.empty() ? 0 : layers.front().self.length(); }
  /// Keeps batch rows `index` (beam search reordering).
  void select(const torch::Tensor& index);
};

/// Decoder for the generative architectures.
///
/// Args (forward):
///   embeds: [B, T, D] input embeddings (token embeddings, possibly with
///     image tokens spliced in by concat fusion).
///   padding_mask: [B, T] bool for these T positions (true = padding).
///   positions: [B, T] int64 positions (rotary or learned); undefined means
///     cached length + 0..T-1.
///   attn_mask: [B, T, S] bool, true = blocked, used instead of the causal
///     mask (prefix-LM); undefined means causal.
///   context, context_mask: cross-attention memory [B, N, Dc] and [B, N].
///   cache: DecoderCache, extended by this call.
/// Shape: returns hidden states [B, T, D] after the final norm;
/// `logits(hidden)` gives [B, T, vocab_size].
class TextDecoderImpl : public torch::nn::Cloneable<TextDecoderImpl> {
 public:
  explicit TextDecoderImpl(TextDecoderOptions options_ = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  /// Token ids [B, T] -> embeddings [B, T, D]; ids must be in [0, vocab_size).
  torch::Tensor embed(const torch::Tensor& token_ids);
  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& padding_mask = {},
                        const torch::Tensor& positions = {}, const torch::Tensor& attn_mask = {},
                        const torch::Tensor& context = {}, const torch::Tensor& context_mask = {},
                        DecoderCache* cache = nullptr);
  torch::Tensor logits(const torch::Tensor& hidden);
  bool has_cross_attention() const { return options.cross_attention_every() > 0; }
  DecoderCache make_cache() const;
  nlohmann::json config() const;

  TextDecoderOptions options;
  torch::nn::Embedding token_embed{nullptr};
  torch::Tensor pos_embed;  // learned positions only: [1, max_len, D]
  torch::nn::ModuleList blocks{nullptr};
  Norm norm{nullptr};
  Linear lm_head{nullptr};  // only when not tied
};
TORCH_MODULE(TextDecoder);

}  // namespace vlmkit
