// The generative half of vlmkit: text decoder, decoder fusion,
// generation (sampling, beam search, cache), JSON-schema constraints, boxes.
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
#include "internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
using detail::shape_str;
// ---------------------------------------------------------------- text decoder
void DecoderCache::select(const torch::Tensor& index) {
  for (auto& layer : layers) {
    for (KVCache* c : {&layer.self, &layer.cross}) {
      if (c->empty()) continue;
      c->key = c->key.index_select(0, index);
      c->value = c->value.index_select(0, index);
    }
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

// ---------------------------------------------------------------- the decoder-fusion slot
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
// ---------------------------------------------------------------- decoder fusion
torch::Tensor positions_from_mask(const torch::Tensor& padding_mask) {
  return (padding_mask.logical_not().to(torch::kLong).cumsum(1) - 1).clamp_min(0);
}

namespace {
/// [B, L] int64: for each position, how many `counted` positions of the row
/// lie in earlier examples (segment_ids [B, L], -1 at padding).
torch::Tensor count_before_segment(const torch::Tensor& counted, const torch::Tensor& segment_ids) {
  auto seg = segment_ids.clamp_min(0);
  auto per_segment = torch::zeros(seg.sizes(), seg.options()).scatter_add_(1, seg, counted);
  return (per_segment.cumsum(1) - per_segment).gather(1, seg);
}
}  // namespace

torch::Tensor positions_from_segments(const torch::Tensor& padding_mask, const torch::Tensor& segment_ids) {
  auto valid = padding_mask.logical_not().to(torch::kLong);
  return (valid.cumsum(1) - 1 - count_before_segment(valid, segment_ids)).clamp_min(0);
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

// ---------------------------------------------------------------- shared model code
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
    auto in_prefix = (labelled.cumsum(1) - count_before_segment(labelled, segment_ids)).eq(0);
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
  // Per sample: mean over its labelled tokens, then mean over samples that have any.
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

// ---------------------------------------------------------------- generation
namespace {
/// Moves each row's padding to the front so the last column is every row's
/// last real token.
void left_align(DecoderInputs& in) {
  const int64_t b = in.embeds.size(0), l = in.embeds.size(1);
  auto lengths = in.padding_mask.logical_not().sum(1);  // [B]
  auto cols = torch::arange(l, lengths.options()).view({1, l});
  // Row r takes source column (c - (l - len_r)) for c >= l - len_r.
  auto shift = (l - lengths).view({b, 1});
  auto src = (cols - shift).clamp_min(0);
  auto valid = cols.ge(shift);
  in.embeds = in.embeds.gather(1, src.unsqueeze(-1).expand({b, l, in.embeds.size(2)}));
  in.padding_mask = valid.logical_not();
  in.positions = positions_from_mask(in.padding_mask);
  in.prefix_len = torch::full({b}, l, lengths.options());
}

torch::Tensor repeat_rows(const torch::Tensor& t, int64_t k) {
  return t.defined() ? t.repeat_interleave(k, 0) : t;
}
}  // namespace

GenerationOutput generate_from_inputs(TextDecoderImpl& decoder, DecoderInputs prompt,
                                      AttentionPolicy policy, const GenerationOptions& o,
                                      const ConstraintFactory& constraint, const TokenCallback& callback) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(o.max_new_tokens() >= 0, "generate: max_new_tokens must be >= 0, got ", o.max_new_tokens());
  TORCH_CHECK_VALUE(o.num_beams() >= 1, "generate: num_beams must be >= 1, got ", o.num_beams());
  TORCH_CHECK_VALUE(!(o.do_sample() && o.num_beams() > 1), "generate: sampling with beam search is not supported; "
                    "use do_sample with num_beams=1 or beam search without do_sample");
  TORCH_CHECK_VALUE(o.temperature() > 0, "generate: temperature must be > 0, got ", o.temperature());
  TORCH_CHECK_VALUE(o.top_p() > 0 && o.top_p() <= 1, "generate: top_p must be in (0, 1], got ", o.top_p());
  TORCH_CHECK_VALUE(o.top_k() >= 0, "generate: top_k must be >= 0, got ", o.top_k());
  const int64_t vocab = decoder.options.vocab_size();
  for (int64_t s : o.stop_tokens())
    TORCH_CHECK_INDEX(s >= 0 && s < vocab, "generate: stop token ", s, " outside the vocabulary [0, ", vocab, ")");

  left_align(prompt);
  const int64_t batch = prompt.embeds.size(0), prompt_len = prompt.embeds.size(1);
  TORCH_CHECK_VALUE(prompt_len < decoder.options.max_len(), "generate: the prompt takes ", prompt_len,
                    " positions (image tokens included), leaving no room in the context of max_len=",
                    decoder.options.max_len());
  const int64_t budget = std::min(o.max_new_tokens(), decoder.options.max_len() - prompt_len);
  const int64_t k = o.num_beams(), n = batch * k;
  const auto device = prompt.embeds.device();
  if (k > 1) {
    prompt.embeds = repeat_rows(prompt.embeds, k);
    prompt.padding_mask = repeat_rows(prompt.padding_mask, k);
    prompt.positions = repeat_rows(prompt.positions, k);
    prompt.prefix_len = repeat_rows(prompt.prefix_len, k);
    prompt.context = repeat_rows(prompt.context, k);
    prompt.context_mask = repeat_rows(prompt.context_mask, k);
  }
  std::vector<std::unique_ptr<TokenConstraint>> constraints;
  if (constraint) {
    for (int64_t i = 0; i < n; ++i) constraints.push_back(constraint());
    TORCH_CHECK_VALUE(constraints.front()->min_tokens() <= budget, "generate: the output constraint needs at least ",
                      constraints.front()->min_tokens(), " new tokens but only ", budget,
                      " fit (max_new_tokens=", o.max_new_tokens(), ", context max_len=", decoder.options.max_len(),
                      ", prompt ", prompt_len, " positions)");
  }

  c10::optional<at::Generator> generator;
  if (o.do_sample() && o.seed() >= 0) generator = at::make_generator<at::CPUGeneratorImpl>(uint64_t(o.seed()));

  // Running state (no-cache path keeps the whole sequence).
  auto seq = prompt.embeds;
  auto seq_mask = prompt.padding_mask;
  auto seq_pos = prompt.positions;
  auto last_pos = prompt.positions.select(1, prompt_len - 1);  // [N]
  DecoderCache cache = decoder.make_cache();
  auto run = [&](bool first, const torch::Tensor& step_embeds, const torch::Tensor& step_mask,
                 const torch::Tensor& step_pos) -> torch::Tensor {
    if (o.use_cache()) {
      torch::Tensor attn;
      if (first && policy == AttentionPolicy::prefix_lm)  // whole prompt is prefix
        attn = torch::zeros({n, prompt_len, prompt_len}, torch::TensorOptions().dtype(torch::kBool).device(device));
      auto hidden = decoder.forward(step_embeds, step_mask, step_pos, attn, prompt.context,
                                    prompt.context_mask, &cache);
      return decoder.logits(hidden.select(1, hidden.size(1) - 1));
    }
    if (!first) {
      seq = torch::cat({seq, step_embeds}, 1);
      seq_mask = torch::cat({seq_mask, step_mask}, 1);
      seq_pos = torch::cat({seq_pos, step_pos}, 1);
    }
    torch::Tensor attn;
    if (policy == AttentionPolicy::prefix_lm)
      attn = policy_attention_mask(policy, prompt.prefix_len, seq.size(1), device);
    auto hidden = decoder.forward(seq, seq_mask, seq_pos, attn, prompt.context, prompt.context_mask);
    return decoder.logits(hidden.select(1, hidden.size(1) - 1));
  };

  auto logits = run(true, prompt.embeds, prompt.padding_mask, prompt.positions);  // [N, V]
  std::vector<std::vector<int64_t>> tokens(n);
  std::vector<char> finished(n, 0);
  std::vector<int64_t> lengths(n, 0);
  auto beam_scores = torch::zeros({n}, torch::TensorOptions().dtype(torch::kDouble));
  if (k > 1)
    for (int64_t i = 0; i < n; ++i)
      if (i % k) beam_scores[i] = -std::numeric_limits<double>::infinity();
  std::vector<double> sample_scores(n, 0.0);
  const auto is_stop = [&](int64_t t) {
    return std::find(o.stop_tokens().begin(), o.stop_tokens().end(), t) != o.stop_tokens().end();
  };
  const double neg_inf = -std::numeric_limits<double>::infinity();

  for (int64_t step = 0; step < budget; ++step) {
    auto scores = logits.to(torch::kCPU, torch::kDouble);  // [N, V]
    if (!constraints.empty()) {
      std::vector<char> allowed(vocab);
      auto blocked = torch::zeros({n, vocab}, torch::kBool);
      auto acc = blocked.accessor<bool, 2>();
      for (int64_t i = 0; i < n; ++i) {
        if (finished[i]) continue;
        std::fill(allowed.begin(), allowed.end(), 0);
        constraints[i]->allowed(allowed, budget - step);
        for (int64_t v = 0; v < vocab; ++v) acc[i][v] = !allowed[v];
      }
      scores = scores.masked_fill(blocked, neg_inf);
    }
    std::vector<int64_t> chosen(n, -1);
    if (k == 1) {
      auto logp = scores.log_softmax(-1);
      torch::Tensor next;
      if (o.do_sample()) {
        auto s = scores / o.temperature();
        if (o.top_k() > 0 && o.top_k() < vocab) {
          auto kth = std::get<0>(s.topk(o.top_k(), -1)).select(1, o.top_k() - 1).unsqueeze(1);
          s = s.masked_fill(s.lt(kth), neg_inf);
        }
        if (o.top_p() < 1.0) {
          auto sorted = s.sort(-1, /*descending=*/true);
          auto probs = std::get<0>(sorted).softmax(-1);
          auto remove = probs.cumsum(-1) - probs > o.top_p();  // keeps at least the top token
          auto mask = torch::zeros_like(remove).scatter(1, std::get<1>(sorted), remove);
          s = s.masked_fill(mask, neg_inf);
        }
        next = generator ? torch::multinomial(s.softmax(-1), 1, false, generator)
                         : torch::multinomial(s.softmax(-1), 1, false);
        next = next.squeeze(1);
      } else {
        next = scores.argmax(-1);
      }
      auto next_acc = next.accessor<int64_t, 1>();
      auto logp_acc = logp.accessor<double, 2>();
      for (int64_t i = 0; i < n; ++i) {
        if (finished[i]) continue;
        chosen[i] = next_acc[i];
        sample_scores[i] += logp_acc[i][chosen[i]];
      }
    } else {
      auto logp = scores.log_softmax(-1);  // [N, V]
      for (int64_t i = 0; i < n; ++i)
        if (finished[i]) {  // a finished beam keeps its score and emits padding
          logp[i].fill_(neg_inf);
          logp[i][o.pad_id()] = 0.0;
        }
      auto cand = (beam_scores.unsqueeze(1) + logp).view({batch, k * vocab});
      auto top = cand.topk(k, -1);
      auto top_scores = std::get<0>(top), top_index = std::get<1>(top);
      auto src = (top_index.div(vocab, "floor") + torch::arange(batch, torch::kLong).unsqueeze(1) * k).view({-1});
      auto tok = top_index.remainder(vocab).view({-1});
      auto src_acc = src.accessor<int64_t, 1>();
      auto tok_acc = tok.accessor<int64_t, 1>();
      std::vector<std::vector<int64_t>> new_tokens(n);
      std::vector<char> new_finished(n);
      std::vector<int64_t> new_lengths(n);
      std::vector<std::unique_ptr<TokenConstraint>> new_constraints(constraints.empty() ? 0 : n);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = src_acc[i];
        new_tokens[i] = tokens[s];
        new_finished[i] = finished[s];
        new_lengths[i] = lengths[s];
        if (!constraints.empty()) new_constraints[i] = constraints[s]->clone();
        chosen[i] = new_finished[i] ? -1 : tok_acc[i];
      }
      tokens = std::move(new_tokens);
      finished = std::move(new_finished);
      lengths = std::move(new_lengths);
      if (!constraints.empty()) constraints = std::move(new_constraints);
      beam_scores = top_scores.reshape({-1});
      auto index = src.to(device);
      if (o.use_cache()) {
        cache.select(index);
      } else {
        seq = seq.index_select(0, index);
        seq_mask = seq_mask.index_select(0, index);
        seq_pos = seq_pos.index_select(0, index);
      }
      last_pos = last_pos.index_select(0, index);
    }
    std::vector<int64_t> step_tokens(n, -1);
    std::vector<int64_t> feed(n, o.pad_id());
    std::vector<char> feed_pad(n, 1);
    for (int64_t i = 0; i < n; ++i) {
      if (chosen[i] < 0) continue;
      tokens[i].push_back(chosen[i]);
      ++lengths[i];
      step_tokens[i] = chosen[i];
      if (!constraints.empty()) constraints[i]->advance(chosen[i]);
      feed[i] = chosen[i];
      feed_pad[i] = 0;
      if (is_stop(chosen[i])) finished[i] = 1;
    }
    bool keep_going = true;
    if (callback) {
      // Beam search reports the tokens of beam 0 of each sample.
      std::vector<int64_t> report;
      for (int64_t i = 0; i < n; i += k) report.push_back(step_tokens[i]);
      keep_going = callback(report);
    }
    if (!keep_going || std::all_of(finished.begin(), finished.end(), [](char f) { return f != 0; })) break;
    if (step + 1 == budget) break;
    auto feed_ids = torch::tensor(feed, torch::kLong).view({n, 1}).to(device);
    auto step_mask = torch::tensor(std::vector<int64_t>(feed_pad.begin(), feed_pad.end()), torch::kLong)
                         .to(torch::kBool).view({n, 1}).to(device);
    last_pos = last_pos + 1;
    // Generated ids are in range by construction: skip embed()'s range check
    // (two device syncs per step).
    logits = run(false, decoder.token_embed->forward(feed_ids), step_mask, last_pos.view({n, 1}));
  }

  GenerationOutput out;
  for (int64_t r = 0; r < batch; ++r) {
    int64_t best = r * k;
    if (k > 1) {
      double best_score = neg_inf;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = r * k + j;
        const double norm = std::pow(double(std::max<int64_t>(lengths[i], 1)), o.length_penalty());
        const double s = beam_scores[i].item<double>() / norm;
        if (s > best_score) best_score = s, best = i;
      }
      out.scores.push_back(beam_scores[best].item<double>());
    } else {
      out.scores.push_back(sample_scores[best]);
    }
    out.tokens.push_back(tokens[best]);
  }
  return out;
}

// ---------------------------------------------------------------- boxes
int64_t normalize_coordinate(double pixel, int64_t size) {
  TORCH_CHECK_VALUE(size > 0, "box coordinates need a positive image size, got ", size);
  const double n = std::round(pixel / double(size) * 999.0);
  return static_cast<int64_t>(std::min(999.0, std::max(0.0, n)));
}

double denormalize_coordinate(int64_t normalized, int64_t size) {
  return double(normalized) / 999.0 * double(size);
}

std::string box_to_text(const Box& box, int64_t width, int64_t height) {
  std::ostringstream s;
  s << "[" << normalize_coordinate(box.x1, width) << "," << normalize_coordinate(box.y1, height) << ","
    << normalize_coordinate(box.x2, width) << "," << normalize_coordinate(box.y2, height) << "]";
  return s.str();
}

std::vector<Box> parse_boxes(const std::string& text, int64_t width, int64_t height) {
  TORCH_CHECK_VALUE(width > 0 && height > 0, "parse_boxes: image size must be positive, got ", width,
                    "x", height);
  static const std::regex pattern(R"(\[\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\])");
  std::vector<Box> boxes;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), pattern); it != std::sregex_iterator(); ++it) {
    const auto& m = *it;
    int64_t v[4];
    for (int j = 0; j < 4; ++j) v[j] = std::stoll(m[j + 1].str());
    if (v[0] > 999 || v[1] > 999 || v[2] > 999 || v[3] > 999) continue;
    boxes.push_back({denormalize_coordinate(v[0], width), denormalize_coordinate(v[1], height),
                     denormalize_coordinate(v[2], width), denormalize_coordinate(v[3], height)});
  }
  return boxes;
}

}  // namespace vlmkit
