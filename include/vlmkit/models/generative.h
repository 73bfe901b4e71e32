#pragma once
/// What the two generative architectures share: the output struct, the
/// forward pass from fused decoder inputs, and prompt handling.
#include <array>

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

/// Raises ValueError unless positions of `kind` fit a projector whose output
/// lies on `sample_grid` (its output_grid for some input grid; {0, 0}: none)
/// and has width `dim`; `who` names the architecture.
void check_image_positions(ImagePositions kind, std::array<int64_t, 2> sample_grid, int64_t dim, const char* who);

/// Projected image tokens [I, M, D] on a rows x cols grid (M == rows * cols)
/// plus the position table of `kind` (ImagePositions::none: unchanged), times
/// `gate` [D] when defined (gated_sincos2d).
torch::Tensor add_image_positions(ImagePositions kind, const torch::Tensor& tokens, std::array<int64_t, 2> grid,
                                  const torch::Tensor& gate, const char* who);

}  // namespace vlmkit
