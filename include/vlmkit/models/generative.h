#pragma once
/// What the two generative architectures share: the output struct, the
/// forward pass from fused decoder inputs, and prompt handling.
#include "vlmkit/config.h"
#include "vlmkit/fusion/decoder_fusion.h"
#include "vlmkit/generate/generate.h"
#include "vlmkit/modules/text_decoder.h"

namespace vlmkit {

struct DecoderOutput {
  torch::Tensor logits;        // [B, L, V]
  torch::Tensor loss;          // scalar, undefined without labels
  torch::Tensor labels;        // [B, L] after fusion (image positions ignored)
  torch::Tensor padding_mask;  // [B, L]
};

/// Runs the decoder on fused inputs under the attention policy; computes the
/// next-token loss when inputs.labels is defined.
DecoderOutput decode_fused(TextDecoderImpl& decoder, const DecoderInputs& inputs,
                           AttentionPolicy policy, double label_smoothing,
                           LossReduction reduction = LossReduction::token);

/// Validates token ids [B, T] int64 and returns the padding mask (given, or
/// ids == pad_id); `who` names the caller in errors.
torch::Tensor check_decoder_ids(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                                const TextDecoderImpl& decoder, const char* who);

/// Labels [B, T] int64 like ids, each a token id or kIgnoreIndex (undefined: fine).
void check_labels(const torch::Tensor& labels, const torch::Tensor& ids, const TextDecoderImpl& decoder,
                  const char* who);

/// Concat fusion with one image per example: every prompt (every example of
/// a packed row when segment_ids is defined) holds exactly one <image>
/// placeholder; raises ValueError naming the first that does not.
void check_one_placeholder_per_example(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                                       const torch::Tensor& segment_ids, int64_t image_token_id,
                                       const char* who);

/// Checks that projector, fusion and decoder fit together; raises ValueError
/// naming the mismatch.
void check_generative_slots(int64_t projector_dim, DecoderFusionType fusion,
                            const TextDecoderImpl& decoder, const char* who);

}  // namespace vlmkit
