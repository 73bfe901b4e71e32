// Code the generative architectures share: attention policies, id and label
// checks, the next-token loss (models/generative.h).
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
#include "vlmkit/modules/vit.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
using detail::shape_str;

torch::Tensor policy_attention_mask(AttentionPolicy policy, const torch::Tensor& prefix_len,
                                    int64_t length, torch::Device device) {
  auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
  auto rows = torch::arange(length, opts).view({1, length, 1});
  auto cols = torch::arange(length, opts).view({1, 1, length});
  auto blocked = cols.gt(rows);  // causal
  if (policy == AttentionPolicy::prefix_lm) blocked = blocked.logical_and(cols.ge(prefix_len.view({-1, 1, 1})));
  return blocked.expand({prefix_len.size(0), length, length});
}

torch::Tensor packed_attention_mask(AttentionPolicy policy, const torch::Tensor& segment_ids,
                                    const torch::Tensor& labels) {
  TORCH_CHECK_VALUE(segment_ids.dim() == 2, "packed_attention_mask: expected segment_ids [B, L], got ",
                    shape_str(segment_ids));
  const int64_t length = segment_ids.size(1);
  auto opts = torch::TensorOptions().dtype(torch::kLong).device(segment_ids.device());
  auto rows = torch::arange(length, opts).view({1, length, 1});
  auto cols = torch::arange(length, opts).view({1, 1, length});
  auto seen = cols.le(rows);  // causal
  if (policy == AttentionPolicy::prefix_lm) {
    // A key is in its example's prefix while no label of the example lies at or before it.
    auto labelled = labels.defined() ? labels.ne(kIgnoreIndex).to(torch::kLong)
                                     : torch::zeros(segment_ids.sizes(), opts);
    auto in_prefix = (labelled.cumsum(1) - detail::count_before_segment(labelled, segment_ids)).eq(0);
    seen = seen.logical_or(in_prefix.unsqueeze(1));
  }
  return segment_ids.unsqueeze(2).eq(segment_ids.unsqueeze(1)).logical_and(seen).logical_not();
}

torch::Tensor next_token_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                              double label_smoothing, LossReduction reduction, const torch::Tensor& segment_ids) {
  TORCH_CHECK_VALUE(logits.dim() == 3 && labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                        labels.size(1) == logits.size(1),
                    "next_token_loss: expected logits [B, L, V] and labels [B, L], got ",
                    shape_str(logits), " and ", shape_str(labels));
  TORCH_CHECK_VALUE(!segment_ids.defined() || segment_ids.sizes() == labels.sizes(),
                    "next_token_loss: expected segment_ids of shape ", shape_str(labels), ", got ",
                    shape_str(segment_ids));
  const int64_t b = logits.size(0), v = logits.size(2);
  auto pred = logits.slice(1, 0, -1).reshape({-1, v});
  auto target = labels.slice(1, 1);
  // Packed rows: an example's first token is not predicted from the one before.
  if (segment_ids.defined())
    target = target.masked_fill(segment_ids.slice(1, 1).ne(segment_ids.slice(1, 0, -1)), kIgnoreIndex);
  auto valid_target = target.ne(kIgnoreIndex);
  TORCH_CHECK_VALUE(valid_target.any().item<bool>(),
                    "next_token_loss: no labelled positions (every label is ", kIgnoreIndex, ")");
  auto options = F::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex).label_smoothing(label_smoothing);
  if (reduction == LossReduction::token) return F::cross_entropy(pred, target.reshape({-1}), options);
  // Per sample: mean over its labelled tokens (sqrt: over sqrt of their number), then
  // over samples that have any.
  auto per_token = F::cross_entropy(pred, target.reshape({-1}), options.reduction(torch::kNone)).view({b, -1});
  auto valid = valid_target.to(per_token.scalar_type());
  torch::Tensor sums, count;
  if (segment_ids.defined()) {
    const int64_t length = labels.size(1);
    auto sample = (segment_ids.slice(1, 1).clamp_min(0) +
                   torch::arange(b, segment_ids.options()).unsqueeze(1) * length).reshape({-1});
    sums = torch::zeros({b * length}, per_token.options()).index_add_(0, sample, (per_token * valid).reshape({-1}));
    count = torch::zeros({b * length}, per_token.options()).index_add_(0, sample, valid.reshape({-1}));
  } else {
    sums = (per_token * valid).sum(1);
    count = valid.sum(1);
  }
  if (reduction == LossReduction::sqrt) {
    // Each example's token sum over sqrt(n), normalised by the sum of sqrt(n):
    // examples without labels have n = 0 and add nothing to either.
    auto root = count.sqrt();
    return (sums / root.clamp_min(1)).sum() / root.sum();
  }
  auto per_sample = sums / count.clamp_min(1);
  auto has = count.gt(0).to(per_sample.scalar_type());
  return (per_sample * has).sum() / has.sum();
}

DecoderOutput decode_fused(TextDecoderImpl& decoder, const DecoderInputs& in, AttentionPolicy policy,
                           double label_smoothing, LossReduction reduction) {
  torch::Tensor attn;
  if (in.segment_ids.defined())
    attn = packed_attention_mask(policy, in.segment_ids, in.labels);
  else if (policy == AttentionPolicy::prefix_lm)
    attn = policy_attention_mask(policy, in.prefix_len, in.embeds.size(1), in.embeds.device());
  auto hidden = decoder.forward(in.embeds, in.padding_mask, in.positions, attn, in.context, in.context_mask);
  DecoderOutput out;
  out.logits = decoder.logits(hidden);
  out.labels = in.labels;
  out.padding_mask = in.padding_mask;
  if (in.labels.defined())
    out.loss = next_token_loss(out.logits, in.labels, label_smoothing, reduction, in.segment_ids);
  return out;
}


void check_labels(const torch::Tensor& labels, const torch::Tensor& ids, const TextDecoderImpl& decoder,
                  const char* who) {
  if (!labels.defined()) return;
  TORCH_CHECK_TYPE(labels.scalar_type() == torch::kLong, who, ": expected labels of dtype int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.sizes() == ids.sizes(), who, ": expected labels of shape ", shape_str(ids),
                    " (that of input_ids), got ", shape_str(labels));
  const int64_t v = decoder.options.vocab_size();
  TORCH_CHECK_INDEX(labels.eq(kIgnoreIndex).logical_or(labels.ge(0).logical_and(labels.lt(v))).all().item<bool>(),
                    who, ": labels must be token ids in [0, ", v, ") or ", kIgnoreIndex, " (ignored), got values in [",
                    labels.min().item<int64_t>(), ", ", labels.max().item<int64_t>(), "]");
}

torch::Tensor check_decoder_ids(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                                const TextDecoderImpl& decoder, const char* who) {
  TORCH_CHECK_TYPE(ids.defined() && ids.scalar_type() == torch::kLong, who,
                   ": expected input_ids of dtype int64, got ",
                   ids.defined() ? c10::toString(ids.scalar_type()) : "undefined");
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) > 0 && ids.size(1) > 0, who,
                    ": expected input_ids of shape [B, T] with B, T >= 1, got ", shape_str(ids));
  if (!padding_mask.defined()) return ids.eq(decoder.options.pad_id());
  TORCH_CHECK_TYPE(padding_mask.scalar_type() == torch::kBool, who,
                   ": expected padding_mask of dtype bool, got ", padding_mask.scalar_type());
  TORCH_CHECK_VALUE(padding_mask.sizes() == ids.sizes(), who, ": expected padding_mask of shape ",
                    shape_str(ids), ", got ", shape_str(padding_mask));
  return padding_mask;
}

void check_image_positions(ImagePositions kind, std::array<int64_t, 2> sample_grid, int64_t dim, const char* who) {
  if (kind == ImagePositions::none) return;
  TORCH_CHECK_VALUE(sample_grid[0] > 0 && sample_grid[1] > 0, who, ": image_positions \"", to_name(kind),
                    "\" needs a projector whose tokens lie on a grid; this one's do not (a resampler's "
                    "learned queries are told apart by the queries themselves): use image_positions \"none\"");
  TORCH_CHECK_VALUE(dim % 4 == 0, who, ": image_positions \"", to_name(kind),
                    "\" needs a projector width divisible by 4, got ", dim);
}

torch::Tensor add_image_positions(ImagePositions kind, const torch::Tensor& tokens, std::array<int64_t, 2> grid,
                                  const torch::Tensor& gate, const char* who) {
  if (kind == ImagePositions::none) return tokens;
  TORCH_CHECK_VALUE(tokens.dim() == 3 && grid[0] * grid[1] == tokens.size(1), who,
                    ": expected projected image tokens [I, ", grid[0] * grid[1], ", D] on the projector's ",
                    grid[0], "x", grid[1], " grid, got ", shape_str(tokens));
  auto table = detail::sincos_2d(grid[0], grid[1], tokens.size(2)).to(tokens.device());
  if (gate.defined()) table = table * gate;
  return tokens + table.to(tokens.scalar_type()).unsqueeze(0);
}

std::pair<torch::Tensor, torch::Tensor> pad_token_lists(const std::vector<std::vector<int64_t>>& ids,
                                                        int64_t pad_id) {
  TORCH_CHECK_VALUE(!ids.empty(), "expected at least one prompt, got none");
  size_t longest = 0;
  for (const auto& row : ids) longest = std::max(longest, row.size());
  TORCH_CHECK_VALUE(longest > 0, "expected non-empty prompts");
  auto out = torch::full({int64_t(ids.size()), int64_t(longest)}, pad_id, torch::kLong);
  auto mask = torch::ones({int64_t(ids.size()), int64_t(longest)}, torch::kBool);
  for (size_t r = 0; r < ids.size(); ++r) {
    TORCH_CHECK_VALUE(!ids[r].empty(), "prompt ", r, " is empty");
    out[r].slice(0, 0, ids[r].size()).copy_(torch::tensor(ids[r], torch::kLong));
    mask[r].slice(0, 0, ids[r].size()).fill_(false);
  }
  return {out, mask};
}
}  // namespace vlmkit
