// The decoder-fusion slot: concat and cross-attention, positions and packed
// segments (fusion/decoder_fusion.h).
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

std::shared_ptr<DecoderFusionModule> make_decoder_fusion(DecoderFusionType type, int64_t image_token_id) {
  switch (type) {
    case DecoderFusionType::concat: return std::make_shared<ConcatFusionImpl>(image_token_id);
    case DecoderFusionType::cross_attention: return std::make_shared<CrossAttentionDecoderFusionImpl>();
  }
  TORCH_CHECK_VALUE(false, "invalid decoder fusion value ", static_cast<int>(type));
}

void ConcatFusionImpl::check_slots(int64_t projector_dim, const TextDecoderOptions& o, const char* who) const {
  TORCH_CHECK_VALUE(o.cross_attention_every() == 0, who,
                    ": concat fusion needs a decoder without cross-attention layers "
                    "(decoder.cross_attention_every = 0), got ", o.cross_attention_every());
  TORCH_CHECK_VALUE(projector_dim == memory_width(o), who, ": with concat fusion the projector must output the "
                    "decoder width ", memory_width(o), ", got ", projector_dim);
}

void CrossAttentionDecoderFusionImpl::check_slots(int64_t projector_dim, const TextDecoderOptions& o,
                                                  const char* who) const {
  TORCH_CHECK_VALUE(o.cross_attention_every() >= 1, who,
                    ": cross_attention fusion needs decoder.cross_attention_every >= 1");
  TORCH_CHECK_VALUE(projector_dim == memory_width(o), who, ": the projector must output the decoder's "
                    "cross-attention width ", memory_width(o), ", got ", projector_dim);
}

void ConcatFusionImpl::check_one_image_per_example(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                                                   const torch::Tensor& segment_ids, const char* who) const {
  auto ids_cpu = ids.to(torch::kCPU).contiguous();
  auto pad_cpu = padding_mask.to(torch::kCPU).contiguous();
  auto seg_cpu = segment_ids.defined() ? segment_ids.to(torch::kCPU).contiguous() : torch::Tensor();
  const auto* id = ids_cpu.data_ptr<int64_t>();
  const auto* pad = pad_cpu.data_ptr<bool>();
  const int64_t* seg = seg_cpu.defined() ? seg_cpu.data_ptr<int64_t>() : nullptr;
  const int64_t b = ids.size(0), t = ids.size(1);
  for (int64_t r = 0; r < b; ++r) {
    std::map<int64_t, int64_t> count;  // example -> placeholders
    for (int64_t c = 0; c < t; ++c) {
      if (pad[r * t + c]) continue;
      count[seg ? seg[r * t + c] : 0] += id[r * t + c] == image_token_id;
    }
    if (count.empty()) count[0] = 0;
    for (const auto& [example, n] : count)
      TORCH_CHECK_VALUE(n == 1, who, ": with concat fusion every prompt needs exactly one <image> placeholder (id ",
                        image_token_id, "); row ", r, seg ? " example " + std::to_string(example) : std::string(),
                        " has ", n);
  }
}

torch::Tensor positions_from_mask(const torch::Tensor& padding_mask) {
  return (padding_mask.logical_not().to(torch::kLong).cumsum(1) - 1).clamp_min(0);
}

namespace detail {
/// [B, L] int64: for each position, how many `counted` positions of the row
/// lie in earlier examples (segment_ids [B, L], -1 at padding).
torch::Tensor count_before_segment(const torch::Tensor& counted, const torch::Tensor& segment_ids) {
  auto seg = segment_ids.clamp_min(0);
  auto per_segment = torch::zeros(seg.sizes(), seg.options()).scatter_add_(1, seg, counted);
  return (per_segment.cumsum(1) - per_segment).gather(1, seg);
}
}  // namespace detail

torch::Tensor positions_from_segments(const torch::Tensor& padding_mask, const torch::Tensor& segment_ids) {
  auto valid = padding_mask.logical_not().to(torch::kLong);
  return (valid.cumsum(1) - 1 - detail::count_before_segment(valid, segment_ids)).clamp_min(0);
}

torch::Tensor check_segment_ids(const torch::Tensor& segment_ids, const torch::Tensor& ids,
                                const torch::Tensor& padding_mask, const char* who) {
  if (!segment_ids.defined()) return {};
  TORCH_CHECK_TYPE(segment_ids.scalar_type() == torch::kLong, who, ": expected segment_ids of dtype int64, got ",
                   segment_ids.scalar_type());
  TORCH_CHECK_VALUE(segment_ids.sizes() == ids.sizes(), who, ": expected segment_ids of shape ", shape_str(ids),
                    " (that of input_ids), got ", shape_str(segment_ids));
  auto seg = segment_ids.to(torch::kCPU).contiguous();
  auto pad = padding_mask.to(torch::kCPU).contiguous();
  const auto* s = seg.data_ptr<int64_t>();
  const auto* p = pad.data_ptr<bool>();
  const int64_t b = ids.size(0), t = ids.size(1);
  for (int64_t r = 0; r < b; ++r) {
    int64_t previous = -1;
    for (int64_t c = 0; c < t; ++c) {
      if (p[r * t + c]) continue;
      const int64_t v = s[r * t + c];
      TORCH_CHECK_VALUE(v == previous || v == previous + 1, who,
                        ": segment_ids must number the examples of each row 0, 1, ... in order (padding "
                        "excluded); row ", r, " position ", c, " has ", v, " after ", previous);
      previous = v;
    }
  }
  return segment_ids.masked_fill(padding_mask, -1);
}

namespace {
/// First labelled position per row (the answer starts there), or length.
torch::Tensor prefix_from_labels(const torch::Tensor& labels, int64_t length) {
  auto labelled = labels.ne(kIgnoreIndex);
  return torch::where(labelled.any(1), labelled.to(torch::kLong).argmax(1),
                      torch::full({labels.size(0)}, length, labels.options()));
}
}  // namespace

DecoderInputs ConcatFusionImpl::fuse(const torch::Tensor& text_embeds, const torch::Tensor& token_ids,
                                     const torch::Tensor& padding_mask, const torch::Tensor& memory,
                                     const torch::Tensor& memory_mask, const torch::Tensor& labels,
                                     const torch::Tensor& segment_ids) {
  const int64_t b = token_ids.size(0), t = token_ids.size(1), d = text_embeds.size(2);
  TORCH_CHECK_VALUE(memory.dim() == 3 && memory.size(2) == d, "ConcatFusion: expected image tokens of shape [I, M, ",
                    d, "], got ", shape_str(memory));
  const int64_t images = memory.size(0), m = memory.size(1);
  auto ids_cpu = token_ids.to(torch::kCPU).contiguous();
  auto pad_cpu = padding_mask.to(torch::kCPU).contiguous();
  const auto* ids = ids_cpu.data_ptr<int64_t>();
  const auto* pad = pad_cpu.data_ptr<bool>();
  int64_t placeholders = 0;
  for (int64_t i = 0; i < b * t; ++i) placeholders += (ids[i] == image_token_id && !pad[i]);
  TORCH_CHECK_VALUE(placeholders == images, "ConcatFusion: the prompts hold ", placeholders,
                    " <image> placeholder(s) (token id ", image_token_id, ") but ", images,
                    " image(s) were given; each placeholder takes the next image in order");
  // Padded image tokens (memory_mask, variable-size images) are left out:
  // sequences are packed, and each image contributes only its valid tokens.
  std::vector<char> mem_valid(size_t(images * m), 1);
  if (memory_mask.defined()) {
    TORCH_CHECK_VALUE(memory_mask.dim() == 2 && memory_mask.size(0) == images && memory_mask.size(1) == m,
                      "ConcatFusion: expected memory_mask of shape [", images, ", ", m, "], got ",
                      shape_str(memory_mask));
    auto mem_pad = memory_mask.to(torch::kCPU).to(torch::kBool).contiguous();
    const auto* mp = mem_pad.data_ptr<bool>();
    for (int64_t i = 0; i < images * m; ++i) mem_valid[size_t(i)] = !mp[i];
  }
  std::vector<int64_t> image_len(images, 0);
  for (int64_t i = 0; i < images * m; ++i) image_len[i / m] += mem_valid[size_t(i)];
  // Trailing padding is dropped (rows are re-padded to the longest fused row).
  std::vector<int64_t> lengths(b, 0), used(b, 0);
  {
    int64_t next = 0;
    for (int64_t r = 0; r < b; ++r) {
      for (int64_t c = 0; c < t; ++c)
        if (!pad[r * t + c]) used[r] = c + 1;
      for (int64_t c = 0; c < used[r]; ++c)
        lengths[r] += (ids[r * t + c] == image_token_id && !pad[r * t + c]) ? image_len[next++] : 1;
    }
  }
  const int64_t length = std::max(*std::max_element(lengths.begin(), lengths.end()), std::min<int64_t>(t, 1));
  // Gather table: rows [0, b*t) are text embeddings, then the image tokens.
  std::vector<int64_t> source(b * length, 0);
  std::vector<char> out_pad(b * length, 1);
  std::vector<int64_t> out_labels(b * length, kIgnoreIndex);
  auto labels_cpu = labels.defined() ? labels.to(torch::kCPU).contiguous() : torch::Tensor();
  const int64_t* lab = labels.defined() ? labels_cpu.data_ptr<int64_t>() : nullptr;
  // Packed rows: each output position keeps its example (image tokens that of their placeholder).
  const bool packed = segment_ids.defined();
  std::vector<int64_t> out_seg(packed ? b * length : 0, -1);
  auto seg_cpu = packed ? segment_ids.to(torch::kCPU).contiguous() : torch::Tensor();
  const int64_t* seg = packed ? seg_cpu.data_ptr<int64_t>() : nullptr;
  int64_t next_image = 0;
  for (int64_t r = 0; r < b; ++r) {
    int64_t o = r * length;
    for (int64_t c = 0; c < used[r]; ++c) {
      const int64_t i = r * t + c;
      if (ids[i] == image_token_id && !pad[i]) {
        for (int64_t k = 0; k < m; ++k) {
          if (!mem_valid[size_t(next_image * m + k)]) continue;
          source[o] = b * t + next_image * m + k;
          out_pad[o] = 0;
          if (seg) out_seg[o] = seg[i];
          ++o;
        }
        ++next_image;
      } else {
        source[o] = i;
        out_pad[o] = pad[i];
        if (lab) out_labels[o] = lab[i];
        if (seg && !pad[i]) out_seg[o] = seg[i];
        ++o;
      }
    }
  }
  const auto device = text_embeds.device();
  auto table = torch::cat({text_embeds.reshape({b * t, d}), memory.reshape({images * m, d})}, 0);
  auto index = torch::tensor(source, torch::kLong).to(device);
  DecoderInputs out;
  out.embeds = table.index_select(0, index).view({b, length, d});
  auto pad_out = torch::tensor(std::vector<int64_t>(out_pad.begin(), out_pad.end()), torch::kLong)
                     .to(torch::kBool)
                     .view({b, length});
  out.padding_mask = pad_out.to(device);
  if (packed) {
    out.segment_ids = torch::tensor(out_seg, torch::kLong).view({b, length}).to(device);
    out.positions = positions_from_segments(out.padding_mask, out.segment_ids);
  } else {
    out.positions = positions_from_mask(out.padding_mask);
  }
  if (labels.defined()) {
    out.labels = torch::tensor(out_labels, torch::kLong).view({b, length}).to(device);
    out.prefix_len = prefix_from_labels(out.labels, length);
  } else {
    out.prefix_len = torch::full({b}, length, torch::TensorOptions().dtype(torch::kLong).device(device));
  }
  return out;
}

DecoderInputs CrossAttentionDecoderFusionImpl::fuse(const torch::Tensor& text_embeds,
                                                    const torch::Tensor& token_ids,
                                                    const torch::Tensor& padding_mask,
                                                    const torch::Tensor& memory,
                                                    const torch::Tensor& memory_mask,
                                                    const torch::Tensor& labels,
                                                    const torch::Tensor& segment_ids) {
  const int64_t b = token_ids.size(0), t = token_ids.size(1);
  DecoderInputs out;
  out.embeds = text_embeds;
  out.padding_mask = padding_mask;
  out.labels = labels;
  out.prefix_len = labels.defined() ? prefix_from_labels(labels, t)
                                    : torch::full({b}, t, torch::TensorOptions().dtype(torch::kLong).device(text_embeds.device()));
  if (!segment_ids.defined()) {
    TORCH_CHECK_VALUE(memory.dim() == 3 && memory.size(0) == b,
                      "CrossAttentionDecoderFusion: expected one image per prompt (", b,
                      "), got image tokens of shape ", shape_str(memory));
    out.positions = positions_from_mask(padding_mask);
    out.context = memory;
    out.context_mask = memory_mask;
    return out;
  }
  // Packed rows: row r's memory is its examples' images side by side (slots
  // up to the most examples of any row); each query sees its own example's.
  auto seg_cpu = segment_ids.to(torch::kCPU).contiguous();
  const auto* seg = seg_cpu.data_ptr<int64_t>();
  std::vector<int64_t> examples(b, 0);
  int64_t total = 0;
  for (int64_t r = 0; r < b; ++r) {
    for (int64_t c = 0; c < t; ++c) examples[r] = std::max(examples[r], seg[r * t + c] + 1);
    total += examples[r];
  }
  TORCH_CHECK_VALUE(memory.dim() == 3 && memory.size(0) == total,
                    "CrossAttentionDecoderFusion: the packed rows hold ", total,
                    " examples, one image each, but got image tokens of shape ", shape_str(memory));
  const int64_t slots = std::max<int64_t>(1, *std::max_element(examples.begin(), examples.end()));
  const int64_t m = memory.size(1), d = memory.size(2);
  std::vector<int64_t> image(b * slots, 0), slot_seg(b * slots, -2);
  for (int64_t r = 0, next = 0; r < b; ++r)
    for (int64_t k = 0; k < examples[r]; ++k) {
      image[r * slots + k] = next++;
      slot_seg[r * slots + k] = k;
    }
  const auto device = memory.device();
  auto index = torch::tensor(image, torch::kLong).to(device);
  out.context = memory.index_select(0, index).view({b, slots * m, d});
  auto key_seg = torch::tensor(slot_seg, torch::kLong).to(device).view({b, slots, 1}).expand({b, slots, m}).reshape({b, 1, slots * m});
  auto blocked = segment_ids.unsqueeze(2).ne(key_seg);  // [B, T, slots * M]
  if (memory_mask.defined()) {
    TORCH_CHECK_VALUE(memory_mask.dim() == 2 && memory_mask.size(0) == total && memory_mask.size(1) == m,
                      "CrossAttentionDecoderFusion: expected memory_mask of shape [", total, ", ", m, "], got ",
                      shape_str(memory_mask));
    blocked = blocked.logical_or(memory_mask.to(torch::kBool).index_select(0, index).view({b, 1, slots * m}));
  }
  out.context_mask = blocked;
  out.segment_ids = segment_ids;
  out.positions = positions_from_segments(padding_mask, segment_ids);
  return out;
}
}  // namespace vlmkit
