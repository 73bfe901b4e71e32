#pragma once
/// Options for the text decoder and the fusion of image tokens into it.
#include <torch/arg.h>

#include <cstdint>

#include "vlmkit/detail/enum_names.h"
#include "vlmkit/options/attention.h"

namespace vlmkit {

enum class DecoderPosition { rotary, learned };
VLMKIT_ENUM_NAMES(DecoderPosition, "decoder position embedding",
                  {DecoderPosition::rotary, "rotary"}, {DecoderPosition::learned, "learned"});

/// Causal pre-norm transformer decoder.
struct TextDecoderOptions {
  /// The default covers the byte-level tokenizer (8 specials + 256 bytes).
  TORCH_ARG(int64_t, vocab_size) = 264;
  /// Context length: prompt (with image tokens when concatenated) + answer.
  TORCH_ARG(int64_t, max_len) = 256;
  TORCH_ARG(int64_t, d_model) = 128;
  TORCH_ARG(int64_t, depth) = 4;
  TORCH_ARG(int64_t, num_heads) = 4;
  TORCH_ARG(double, mlp_ratio) = 4.0;
  TORCH_ARG(double, dropout) = 0.0;
  /// Rotary positions (RoFormer, Su et al. 2021) or a learned table.
  TORCH_ARG(DecoderPosition, pos_embedding) = DecoderPosition::rotary;
  TORCH_ARG(double, rope_theta) = 10000.0;
  /// Output head shares the token embedding matrix (Press & Wolf 2017).
  TORCH_ARG(bool, tie_embeddings) = true;
  /// 0: no cross-attention; N: a cross-attention sub-layer in every N-th
  /// layer (layers N-1, 2N-1, ...; 1 means every layer).
  TORCH_ARG(int64_t, cross_attention_every) = 0;
  /// Flamingo's tanh gate on cross-attention, starting closed at 0.
  TORCH_ARG(bool, gated_cross_attention) = false;
  /// Width of the cross-attention memory; 0 means d_model.
  TORCH_ARG(int64_t, context_dim) = 0;
  TORCH_ARG(int64_t, pad_id) = 0;
  /// Today's decoder blocks (a Llama / Qwen2 / SmolLM-style decoder is
  /// norm "rmsnorm", mlp "swiglu", num_kv_heads < num_heads, rope_theta):
  /// the norms of every block and the final norm.
  TORCH_ARG(NormType, norm) = NormType::layernorm;
  TORCH_ARG(MlpType, mlp) = MlpType::gelu;
  /// Grouped-query attention: key/value heads (0: num_heads).
  TORCH_ARG(int64_t, num_kv_heads) = 0;
  /// RMSNorm of each head's queries and keys in every attention of the decoder,
  /// self- and cross-attention alike.
  TORCH_ARG(bool, qk_norm) = false;
  TORCH_ARG(double, norm_eps) = 1e-5;
  /// Activation checkpointing: while training, each block's activations are
  /// recomputed during backward instead of kept (less memory, one more forward).
  TORCH_ARG(bool, activation_checkpointing) = false;
};

template <class V>
void visit_fields(TextDecoderOptions& o, V& v) {
  v("vocab_size", o.vocab_size());
  v("max_len", o.max_len());
  v("d_model", o.d_model());
  v("depth", o.depth());
  v("num_heads", o.num_heads());
  v("mlp_ratio", o.mlp_ratio());
  v("dropout", o.dropout());
  v("pos_embedding", o.pos_embedding());
  v("rope_theta", o.rope_theta());
  v("tie_embeddings", o.tie_embeddings());
  v("cross_attention_every", o.cross_attention_every());
  v("gated_cross_attention", o.gated_cross_attention());
  v("context_dim", o.context_dim());
  v("pad_id", o.pad_id());
  v("norm", o.norm());
  v("mlp", o.mlp());
  v("num_kv_heads", o.num_kv_heads());
  v("qk_norm", o.qk_norm());
  v("norm_eps", o.norm_eps());
  v("activation_checkpointing", o.activation_checkpointing());
}

enum class DecoderFusionType { concat, cross_attention };
VLMKIT_ENUM_NAMES(DecoderFusionType, "decoder fusion", {DecoderFusionType::concat, "concat"},
                  {DecoderFusionType::cross_attention, "cross_attention"});

/// How concatenated sequences attend: fully causal, or prefix-LM (image and
/// prompt attend bidirectionally, the answer causally; PaliGemma).
enum class AttentionPolicy { causal, prefix_lm };
VLMKIT_ENUM_NAMES(AttentionPolicy, "attention policy", {AttentionPolicy::causal, "causal"},
                  {AttentionPolicy::prefix_lm, "prefix_lm"});

/// How the next-token loss averages: over every answer token of the batch
/// ("token", the usual: an example weighs as its n answer tokens), per sample
/// first and then over samples ("sample": a one-word answer weighs as much as
/// a 100-token JSON, which balances mixed-task batches), or in between
/// ("sqrt", InternVL 2.5's square averaging: each token weighs 1 / sqrt(n), so
/// an example weighs sqrt(n); normalised by the batch's sum of sqrt(n)).
enum class LossReduction { token, sample, sqrt };
VLMKIT_ENUM_NAMES(LossReduction, "loss reduction", {LossReduction::token, "token"},
                  {LossReduction::sample, "sample"}, {LossReduction::sqrt, "sqrt"});

/// Grid positions added to the projected image tokens (encoder-decoder):
/// none, or the fixed 2D sine-cosine table of the projector's output grid
/// (MAE's), so that the decoder can tell which cell a token it attends to
/// lies in. Cross-attention is blind to the order of its memory; without
/// them the cell is known only from what the encoder's tokens kept of its
/// own positions (docs/training.md, "Image positions"). gated_sincos2d
/// scales the table per channel by a learned gate that starts at zero
/// (parameter image_position_gate [D]), so the positions come in as the
/// loss asks for them.
enum class ImagePositions { none, sincos2d, gated_sincos2d };
VLMKIT_ENUM_NAMES(ImagePositions, "image token positions", {ImagePositions::none, "none"},
                  {ImagePositions::sincos2d, "sincos2d"}, {ImagePositions::gated_sincos2d, "gated_sincos2d"});

/// Options of the generative architectures (3 and 4).
struct GenerativeOptions {
  TORCH_ARG(DecoderFusionType, fusion) = DecoderFusionType::concat;
  TORCH_ARG(AttentionPolicy, attention) = AttentionPolicy::causal;
  /// Token id of the image placeholder in the text (concat fusion).
  TORCH_ARG(int64_t, image_token_id) = 3;
  TORCH_ARG(double, label_smoothing) = 0.0;
  TORCH_ARG(LossReduction, loss_reduction) = LossReduction::token;
  /// Encoder-decoder only (architecture 3's memory is not an image grid).
  TORCH_ARG(ImagePositions, image_positions) = ImagePositions::none;
};

template <class V>
void visit_fields(GenerativeOptions& o, V& v) {
  v("attention", o.attention());
  v("image_token_id", o.image_token_id());
  v("label_smoothing", o.label_smoothing());
  v("loss_reduction", o.loss_reduction());
  v("image_positions", o.image_positions());
}

}  // namespace vlmkit
