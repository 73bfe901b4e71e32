#pragma once
/// Pre-norm transformer block (Xiong et al. 2020, "On Layer Normalization in
/// the Transformer Architecture"), optionally with a cross-attention sub-layer.
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>

#include <functional>
#include <torch/nn/modules/normalization.h>

#include "vlmkit/modules/attention.h"
#include "vlmkit/modules/norm.h"

namespace vlmkit {

/// Caches for one block during incremental decoding.
struct BlockCache {
  KVCache self;
  KVCache cross;
};

/// Args (forward):
///   x: [B, T, D]; key_padding_mask [B, S] and attn_mask as in MultiheadAttention;
///   context: [B, N, Dc] for the cross-attention sub-layer (required when the
///   block has one), context_padding_mask [B, N] bool (true = padding), or
///   [B, T, N] bool (true = blocked) to mask per query (packed rows).
/// Shape: returns [B, T, D].
class TransformerBlockImpl : public torch::nn::Cloneable<TransformerBlockImpl> {
 public:
  explicit TransformerBlockImpl(TransformerBlockOptions options_ = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& key_padding_mask = {},
                        const torch::Tensor& attn_mask = {}, bool causal = false,
                        const torch::Tensor& context = {},
                        const torch::Tensor& context_padding_mask = {},
                        BlockCache* cache = nullptr, const torch::Tensor& positions = {});

  TransformerBlockOptions options;
  Norm norm1{nullptr}, norm_cross{nullptr}, norm2{nullptr};
  MultiheadAttention self_attn{nullptr}, cross_attn{nullptr};
  Linear fc1{nullptr}, fc2{nullptr};                            // mlp "gelu"
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};  // mlp "swiglu"
  torch::nn::Dropout dropout{nullptr};
  /// Flamingo's tanh gate on the cross-attention residual (when gated).
  torch::Tensor cross_gate;
};
TORCH_MODULE(TransformerBlock);

namespace detail {
/// ViT/BERT-style initialisation of the encoders, decoder and their blocks: Linear and
/// Embedding weights ~ N(0, 0.02), biases 0, LayerNorm weight 1 and bias 0.
void init_transformer_weights(torch::nn::Module& module);

/// Fan-in initialisation for the narrow, non-residual layers after the encoders
/// (Two-Leg fusion blocks and heads): Linear weights ~ N(0, 1 / in_features),
/// biases 0, so a signal keeps its scale through them. With N(0, 0.02) three
/// such layers shrink it (and the gradients back) many times over, and the image encoder of a
/// Two-Leg model collapses to one output for every image (docs/training.md,
/// "Two-Leg").
void init_fan_in_weights(torch::nn::Module& module);

/// Activation checkpointing (Chen et al. 2016): runs `block(x, context)` without
/// keeping its activations and recomputes them during backward (with the RNG
/// state of the first run, so dropout masks match). Gradients reach x, context
/// (when it requires grad) and the block's parameters as without it.
/// `context` may be undefined.
torch::Tensor checkpoint(const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>& block,
                         const torch::Tensor& x, const torch::Tensor& context);
/// x through encoder blocks (self-attention with `key_padding_mask`), each
/// checkpointed when `checkpointing` and gradients are being recorded.
torch::Tensor run_encoder_blocks(torch::nn::ModuleList& blocks, torch::Tensor x, const torch::Tensor& key_padding_mask,
                                 bool checkpointing);
}  // namespace detail

}  // namespace vlmkit
