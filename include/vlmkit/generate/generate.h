#pragma once
/// Text generation for the generative architectures: greedy, temperature,
/// top-k, top-p, beam search, stop tokens, streaming, token constraints, with
/// or without the KV cache (both give the same tokens).
#include <torch/arg.h>

#include <functional>
#include <memory>
#include <vector>

#include "vlmkit/fusion/decoder_fusion.h"
#include "vlmkit/kernels/decode.h"
#include "vlmkit/modules/text_decoder.h"

namespace vlmkit {

struct GenerationOptions {
  TORCH_ARG(int64_t, max_new_tokens) = 32;
  /// false: greedy (or beam search when num_beams > 1); true: sampling.
  TORCH_ARG(bool, do_sample) = false;
  TORCH_ARG(double, temperature) = 1.0;
  /// 0 = off.
  TORCH_ARG(int64_t, top_k) = 0;
  /// 1.0 = off (nucleus sampling, Holtzman et al. 2019).
  TORCH_ARG(double, top_p) = 1.0;
  TORCH_ARG(int64_t, num_beams) = 1;
  /// Beam score = sum log p / length^length_penalty.
  TORCH_ARG(double, length_penalty) = 1.0;
  /// Generation of a sample ends at any of these (kept in the output).
  TORCH_ARG(std::vector<int64_t>, stop_tokens) = std::vector<int64_t>{2};
  TORCH_ARG(bool, use_cache) = true;
  /// Seed of the sampling generator; -1 uses torch's global generator.
  TORCH_ARG(int64_t, seed) = -1;
  TORCH_ARG(int64_t, pad_id) = 0;
};

/// Restricts which tokens may come next (one instance per sequence).
class TokenConstraint {
 public:
  virtual ~TokenConstraint() = default;
  virtual std::unique_ptr<TokenConstraint> clone() const = 0;
  /// Sets allowed[v] (size vocab) to 1 for every token allowed next, given
  /// that at most `remaining` tokens (this one included) may still come.
  virtual void allowed(std::vector<char>& allowed, int64_t remaining) const = 0;
  virtual void advance(int64_t token) = 0;
  /// Fewest tokens that can still complete the sequence (stop token included).
  virtual int64_t min_tokens() const { return 0; }
};
using ConstraintFactory = std::function<std::unique_ptr<TokenConstraint>()>;

/// Called after every step with the new token of each sequence (-1 for
/// sequences already finished); return false to stop generating.
using TokenCallback = std::function<bool(const std::vector<int64_t>& tokens)>;

struct GenerationOutput {
  /// Generated tokens per sample (prompt excluded, stop token included).
  std::vector<std::vector<int64_t>> tokens;
  /// Sum of log-probabilities of the chosen tokens (beam: the beam score).
  std::vector<double> scores;
};

/// Runs the decoder from fused prompt inputs (right-padded, as fusion
/// returns them).
GenerationOutput generate_from_inputs(TextDecoderImpl& decoder, DecoderInputs prompt,
                                      AttentionPolicy policy, const GenerationOptions& options,
                                      const ConstraintFactory& constraint = nullptr,
                                      const TokenCallback& callback = nullptr);

/// [B, L, L] bool attention mask (true = blocked) for the policy: causal,
/// or prefix-LM where positions < prefix_len[b] see each other.
torch::Tensor policy_attention_mask(AttentionPolicy policy, const torch::Tensor& prefix_len,
                                    int64_t length, torch::Device device);

/// Packed rows: [B, L, L] bool (true = blocked). Each position sees only its
/// own example (segment_ids [B, L]), causally, or under prefix-LM also every
/// position of its example before the example's first label (labels [B, L];
/// undefined: the whole example).
torch::Tensor packed_attention_mask(AttentionPolicy policy, const torch::Tensor& segment_ids,
                                    const torch::Tensor& labels);

/// Next-token cross-entropy: logits [B, L, V] at t predict labels[t + 1];
/// kIgnoreIndex positions do not count. Per-sample reduction averages each
/// sample's tokens first: a sample is a row, or with segment_ids [B, L]
/// (packed rows) an example.
torch::Tensor next_token_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                              double label_smoothing = 0.0, LossReduction reduction = LossReduction::token,
                              const torch::Tensor& segment_ids = {});

namespace detail {
/// Why generation's cached steps cannot run on the fused decoding step
/// (kernels/decode.h) for this decoder and prompt now, or "" when they can.
std::string fused_decode_unsupported(TextDecoderImpl& decoder, const torch::Tensor& embeds);
/// The decoder's weights as the fused decoding step reads them.
kernels::DecodeWeights decode_weights(TextDecoderImpl& decoder);
}  // namespace detail

/// Right-padded [B, T] ids and padding mask from token lists.
std::pair<torch::Tensor, torch::Tensor> pad_token_lists(const std::vector<std::vector<int64_t>>& ids,
                                                        int64_t pad_id);

}  // namespace vlmkit
