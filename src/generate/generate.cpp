// Generation: greedy, sampling and beam search, with the KV cache and
// token constraints (generate/generate.h).
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
#include "vlmkit/kernels/decode.h"
#include "vlmkit/models/generative.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
using detail::shape_str;

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

void check_options(const GenerationOptions& o, int64_t vocab) {
  TORCH_CHECK_VALUE(o.max_new_tokens() >= 0, "generate: max_new_tokens must be >= 0, got ", o.max_new_tokens());
  TORCH_CHECK_VALUE(o.num_beams() >= 1, "generate: num_beams must be >= 1, got ", o.num_beams());
  TORCH_CHECK_VALUE(!(o.do_sample() && o.num_beams() > 1), "generate: sampling with beam search is not supported; "
                    "use do_sample with num_beams=1 or beam search without do_sample");
  TORCH_CHECK_VALUE(o.temperature() > 0, "generate: temperature must be > 0, got ", o.temperature());
  TORCH_CHECK_VALUE(o.top_p() > 0 && o.top_p() <= 1, "generate: top_p must be in (0, 1], got ", o.top_p());
  TORCH_CHECK_VALUE(o.top_k() >= 0, "generate: top_k must be >= 0, got ", o.top_k());
  for (int64_t s : o.stop_tokens())
    TORCH_CHECK_INDEX(s >= 0 && s < vocab, "generate: stop token ", s, " outside the vocabulary [0, ", vocab, ")");
}

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

/// The decoder side of generation: the prompt's forward (prefill), then one
/// forward per new token (step), through the KV cache or, without it, over the
/// whole sequence so far; `select` reorders the rows after a beam step.
class DecoderRunner {
 public:
  /// capacity: the most positions a row will hold (prompt and new tokens).
  DecoderRunner(TextDecoderImpl& decoder, const DecoderInputs& prompt, AttentionPolicy policy, bool use_cache,
                int64_t capacity)
      : decoder_(decoder), prompt_(prompt), policy_(policy), use_cache_(use_cache), capacity_(capacity),
        cache_(decoder.make_cache()),
        seq_(prompt.embeds), seq_mask_(prompt.padding_mask), seq_pos_(prompt.positions),
        last_pos_(prompt.positions.select(1, prompt.positions.size(1) - 1)) {}

  /// Logits of the prompt's last position [N, V].
  torch::Tensor prefill() {
    const int64_t n = prompt_.embeds.size(0), len = prompt_.embeds.size(1);
    torch::Tensor attn;
    if (use_cache_) {
      if (policy_ == AttentionPolicy::prefix_lm)  // the whole prompt is prefix
        attn = torch::zeros({n, len, len}, torch::TensorOptions().dtype(torch::kBool).device(prompt_.embeds.device()));
      auto logits = last_logits(decoder_.forward(prompt_.embeds, prompt_.padding_mask, prompt_.positions, attn,
                                                 prompt_.context, prompt_.context_mask, &cache_));
      // Later steps: the fused kernel where the decoder qualifies, from this cache.
      if (capacity_ > len && detail::fused_decode_unsupported(decoder_, prompt_.embeds).empty()) {
        std::vector<std::pair<torch::Tensor, torch::Tensor>> self_kv, cross_kv;
        for (const auto& layer : cache_.layers) {
          self_kv.emplace_back(layer.self.key, layer.self.value);
          cross_kv.emplace_back(layer.cross.key, layer.cross.value);
        }
        fused_ = std::make_unique<kernels::FusedDecoder>(detail::decode_weights(decoder_), self_kv, cache_.padding_mask,
                                                          cross_kv, prompt_.context_mask, capacity_);
        cache_ = decoder_.make_cache();  // the kernel holds its own copy
      }
      return logits;
    }
    return full_forward();
  }

  /// Logits after feeding one token per row [N] (`pad` rows: finished, fed padding).
  torch::Tensor step(const torch::Tensor& ids, const torch::Tensor& pad) {
    const int64_t n = ids.size(0);
    const auto device = prompt_.embeds.device();
    last_pos_ = last_pos_ + 1;
    if (fused_) return fused_->step(ids, pad, last_pos_);
    // Generated ids are in range by construction: skip embed()'s range check
    // (two device syncs per step).
    auto embeds = decoder_.token_embed->forward(ids.view({n, 1}).to(device));
    auto mask = pad.view({n, 1}).to(device);
    auto pos = last_pos_.view({n, 1});
    if (use_cache_)
      return last_logits(decoder_.forward(embeds, mask, pos, {}, prompt_.context, prompt_.context_mask, &cache_));
    seq_ = torch::cat({seq_, embeds}, 1);
    seq_mask_ = torch::cat({seq_mask_, mask}, 1);
    seq_pos_ = torch::cat({seq_pos_, pos}, 1);
    return full_forward();
  }

  /// Rows take the state of rows `index` [N] (beam search).
  void select(const torch::Tensor& index) {
    if (fused_) {
      fused_->select(index);
    } else if (use_cache_) {
      cache_.select(index);
    } else {
      seq_ = seq_.index_select(0, index);
      seq_mask_ = seq_mask_.index_select(0, index);
      seq_pos_ = seq_pos_.index_select(0, index);
    }
    last_pos_ = last_pos_.index_select(0, index);
  }

 private:
  torch::Tensor last_logits(const torch::Tensor& hidden) { return decoder_.logits(hidden.select(1, hidden.size(1) - 1)); }
  torch::Tensor full_forward() {
    torch::Tensor attn;
    if (policy_ == AttentionPolicy::prefix_lm)
      attn = policy_attention_mask(policy_, prompt_.prefix_len, seq_.size(1), seq_.device());
    return last_logits(decoder_.forward(seq_, seq_mask_, seq_pos_, attn, prompt_.context, prompt_.context_mask));
  }

  TextDecoderImpl& decoder_;
  const DecoderInputs& prompt_;
  AttentionPolicy policy_;
  bool use_cache_;
  int64_t capacity_;
  DecoderCache cache_;
  std::unique_ptr<kernels::FusedDecoder> fused_;  // set by prefill() where the decoder qualifies
  torch::Tensor seq_, seq_mask_, seq_pos_, last_pos_;  // seq_*: the no-cache path's whole sequence
};

/// What each of the N rows (batch x beams) has generated so far.
struct Hypotheses {
  std::vector<std::vector<int64_t>> tokens;
  std::vector<char> finished;
  std::vector<int64_t> lengths;
  std::vector<std::unique_ptr<TokenConstraint>> constraints;  // empty: unconstrained
  explicit Hypotheses(int64_t n) : tokens(size_t(n)), finished(size_t(n), 0), lengths(size_t(n), 0) {}
};

/// Scores [N, V] with the tokens each row's constraint forbids at -inf.
torch::Tensor constrain(torch::Tensor scores, const Hypotheses& h, int64_t remaining) {
  if (h.constraints.empty()) return scores;
  const int64_t n = scores.size(0), vocab = scores.size(1);
  std::vector<char> allowed(static_cast<size_t>(vocab));
  auto blocked = torch::zeros({n, vocab}, torch::kBool);
  auto acc = blocked.accessor<bool, 2>();
  for (int64_t i = 0; i < n; ++i) {
    if (h.finished[size_t(i)]) continue;
    std::fill(allowed.begin(), allowed.end(), 0);
    h.constraints[size_t(i)]->allowed(allowed, remaining);
    for (int64_t v = 0; v < vocab; ++v) acc[i][v] = !allowed[size_t(v)];
  }
  return scores.masked_fill(blocked, kNegInf);
}

/// Greedy or sampled (temperature, top-k, top-p) next token of each row [N].
torch::Tensor pick_next(const torch::Tensor& scores, const GenerationOptions& o,
                        const c10::optional<at::Generator>& generator) {
  if (!o.do_sample()) return scores.argmax(-1);
  const int64_t vocab = scores.size(1);
  auto s = scores / o.temperature();
  if (o.top_k() > 0 && o.top_k() < vocab) {
    auto kth = std::get<0>(s.topk(o.top_k(), -1)).select(1, o.top_k() - 1).unsqueeze(1);
    s = s.masked_fill(s.lt(kth), kNegInf);
  }
  if (o.top_p() < 1.0) {
    auto sorted = s.sort(-1, /*descending=*/true);
    auto probs = std::get<0>(sorted).softmax(-1);
    auto remove = probs.cumsum(-1) - probs > o.top_p();  // keeps at least the top token
    auto mask = torch::zeros_like(remove).scatter(1, std::get<1>(sorted), remove);
    s = s.masked_fill(mask, kNegInf);
  }
  auto next = generator ? torch::multinomial(s.softmax(-1), 1, false, generator)
                        : torch::multinomial(s.softmax(-1), 1, false);
  return next.squeeze(1);
}

/// One beam-search step over N = batch x k rows: the k best continuations of each
/// sample among its beams' (a finished beam keeps its score and emits padding).
/// Reorders `h` and `beam_scores` to the survivors and returns (source row of each
/// survivor [N], its token or -1 when finished).
std::pair<torch::Tensor, std::vector<int64_t>> beam_step(const torch::Tensor& scores, torch::Tensor& beam_scores,
                                                         Hypotheses& h, int64_t k, int64_t pad_id) {
  const int64_t n = scores.size(0), vocab = scores.size(1), batch = n / k;
  auto logp = scores.log_softmax(-1);  // [N, V]
  for (int64_t i = 0; i < n; ++i)
    if (h.finished[size_t(i)]) {
      logp[i].fill_(kNegInf);
      logp[i][pad_id] = 0.0;
    }
  auto top = (beam_scores.unsqueeze(1) + logp).view({batch, k * vocab}).topk(k, -1);
  auto top_index = std::get<1>(top);
  auto src = (top_index.div(vocab, "floor") + torch::arange(batch, torch::kLong).unsqueeze(1) * k).view({-1});
  auto tok = top_index.remainder(vocab).view({-1});
  auto src_acc = src.accessor<int64_t, 1>();
  auto tok_acc = tok.accessor<int64_t, 1>();
  Hypotheses next(n);
  if (!h.constraints.empty()) next.constraints.resize(size_t(n));
  std::vector<int64_t> chosen(size_t(n), -1);
  for (int64_t i = 0; i < n; ++i) {
    const auto s = size_t(src_acc[i]);
    next.tokens[size_t(i)] = h.tokens[s];
    next.finished[size_t(i)] = h.finished[s];
    next.lengths[size_t(i)] = h.lengths[s];
    if (!h.constraints.empty()) next.constraints[size_t(i)] = h.constraints[s]->clone();
    chosen[size_t(i)] = next.finished[size_t(i)] ? -1 : tok_acc[i];
  }
  h = std::move(next);
  beam_scores = std::get<0>(top).reshape({-1});
  return {src, chosen};
}

/// Each sample's answer: its row (greedy, sampling) or its best beam by
/// length-normalised score.
GenerationOutput best_hypotheses(const Hypotheses& h, const torch::Tensor& beam_scores,
                                 const std::vector<double>& sample_scores, int64_t batch, int64_t k,
                                 double length_penalty) {
  GenerationOutput out;
  for (int64_t r = 0; r < batch; ++r) {
    int64_t best = r * k;
    if (k > 1) {
      double best_score = kNegInf;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = r * k + j;
        const double norm = std::pow(double(std::max<int64_t>(h.lengths[size_t(i)], 1)), length_penalty);
        const double s = beam_scores[i].item<double>() / norm;
        if (s > best_score) best_score = s, best = i;
      }
      out.scores.push_back(beam_scores[best].item<double>());
    } else {
      out.scores.push_back(sample_scores[size_t(best)]);
    }
    out.tokens.push_back(h.tokens[size_t(best)]);
  }
  return out;
}
}  // namespace

namespace detail {
std::string fused_decode_unsupported(TextDecoderImpl& decoder, const torch::Tensor& embeds) {
  if (decode_kernel() != "auto") return "decode_kernel is \"aten\"";
  if (!embeds.device().is_cpu()) return "not on the CPU";
  if (at::autocast::is_cpu_enabled()) return "autocast";
  if (decoder.is_training() && decoder.options.dropout() > 0) return "dropout while training";
  for (const auto& p : decoder.parameters())
    if (!p.device().is_cpu() || p.scalar_type() != torch::kFloat) return "weights that are not float32 on the CPU";
  for (const auto& m : decoder.modules(/*include_self=*/false))
    if (const auto* l = m->as<LinearImpl>(); l && l->has_lora() && !l->merged()) return "an unmerged LoRA adapter";
  return "";
}

kernels::DecodeWeights decode_weights(TextDecoderImpl& decoder) {
  const auto held = [](auto& holder) { return holder.is_empty() ? nullptr : holder.get(); };
  kernels::DecodeWeights w;
  const auto keep = [&w](const torch::Tensor& t) -> const float* {
    if (!t.defined()) return nullptr;
    w.storage.push_back(t.detach().contiguous());
    return w.storage.back().data_ptr<float>();
  };
  const auto linear = [&keep](LinearImpl* l) {
    kernels::DecodeLinear out;
    if (!l) return out;
    out.weight = keep(l->weight);
    out.bias = keep(l->bias);
    out.out = l->weight.size(0);
    out.in = l->weight.size(1);
    return out;
  };
  const auto norm = [&keep](NormImpl* n) {
    kernels::DecodeNorm out;
    if (!n) return out;
    out.weight = keep(n->weight);
    out.bias = n->type == NormType::layernorm ? keep(n->bias) : nullptr;
    out.eps = float(n->eps);
    return out;
  };
  const auto attention = [&](MultiheadAttentionImpl* a) {
    kernels::DecodeAttention out;
    if (!a) return out;
    out.q = linear(held(a->q_proj));
    out.k = linear(held(a->k_proj));
    out.v = linear(held(a->v_proj));
    out.o = linear(held(a->out_proj));
    out.kv_heads = a->kv_heads();
    out.qk_norm = !a->q_norm.is_empty();
    out.q_norm = norm(held(a->q_norm));
    out.k_norm = norm(held(a->k_norm));
    return out;
  };
  const auto& o = decoder.options;
  w.d_model = o.d_model();
  w.num_heads = o.num_heads();
  w.kv_heads = o.num_kv_heads() > 0 ? o.num_kv_heads() : o.num_heads();
  w.head_dim = o.d_model() / o.num_heads();
  w.vocab = o.vocab_size();
  w.max_len = o.max_len();
  w.rotary = o.pos_embedding() == DecoderPosition::rotary;
  w.rope_theta = o.rope_theta();
  w.token_embed = keep(decoder.token_embed->weight);
  w.pos_embed = decoder.pos_embed.defined() ? keep(decoder.pos_embed[0]) : nullptr;
  w.lm_head = decoder.lm_head ? keep(decoder.lm_head->weight) : nullptr;
  w.final_norm = norm(held(decoder.norm));
  for (const auto& block : *decoder.blocks) {
    auto* b = block->as<TransformerBlockImpl>();
    kernels::DecodeLayer l;
    l.norm1 = norm(held(b->norm1));
    l.norm2 = norm(held(b->norm2));
    l.self = attention(held(b->self_attn));
    l.has_cross = b->options.cross_attention();
    if (l.has_cross) {
      l.norm_cross = norm(held(b->norm_cross));
      l.cross = attention(held(b->cross_attn));
      l.cross_gate = b->cross_gate.defined() ? std::tanh(b->cross_gate.item<float>()) : 1.0f;
    }
    l.swiglu = b->options.mlp() == MlpType::swiglu;
    if (l.swiglu) {
      l.gate = linear(held(b->gate_proj));
      l.up = linear(held(b->up_proj));
      l.down = linear(held(b->down_proj));
    } else {
      l.fc1 = linear(held(b->fc1));
      l.fc2 = linear(held(b->fc2));
    }
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace detail

GenerationOutput generate_from_inputs(TextDecoderImpl& decoder, DecoderInputs prompt,
                                      AttentionPolicy policy, const GenerationOptions& o,
                                      const ConstraintFactory& constraint, const TokenCallback& callback) {
  torch::NoGradGuard no_grad;
  const int64_t vocab = decoder.options.vocab_size();
  check_options(o, vocab);

  left_align(prompt);
  const int64_t batch = prompt.embeds.size(0), prompt_len = prompt.embeds.size(1);
  TORCH_CHECK_VALUE(prompt_len < decoder.options.max_len(), "generate: the prompt takes ", prompt_len,
                    " positions (image tokens included), leaving no room in the context of max_len=",
                    decoder.options.max_len());
  const int64_t budget = std::min(o.max_new_tokens(), decoder.options.max_len() - prompt_len);
  const int64_t k = o.num_beams(), n = batch * k;
  if (k > 1) {
    prompt.embeds = repeat_rows(prompt.embeds, k);
    prompt.padding_mask = repeat_rows(prompt.padding_mask, k);
    prompt.positions = repeat_rows(prompt.positions, k);
    prompt.prefix_len = repeat_rows(prompt.prefix_len, k);
    prompt.context = repeat_rows(prompt.context, k);
    prompt.context_mask = repeat_rows(prompt.context_mask, k);
  }
  Hypotheses h(n);
  if (constraint) {
    for (int64_t i = 0; i < n; ++i) h.constraints.push_back(constraint());
    TORCH_CHECK_VALUE(h.constraints.front()->min_tokens() <= budget, "generate: the output constraint needs at least ",
                      h.constraints.front()->min_tokens(), " new tokens but only ", budget,
                      " fit (max_new_tokens=", o.max_new_tokens(), ", context max_len=", decoder.options.max_len(),
                      ", prompt ", prompt_len, " positions)");
  }
  c10::optional<at::Generator> generator;
  if (o.do_sample() && o.seed() >= 0) generator = at::make_generator<at::CPUGeneratorImpl>(uint64_t(o.seed()));

  DecoderRunner runner(decoder, prompt, policy, o.use_cache(), prompt_len + budget);
  auto logits = runner.prefill();  // [N, V]
  auto beam_scores = torch::zeros({n}, torch::TensorOptions().dtype(torch::kDouble));
  if (k > 1)
    for (int64_t i = 0; i < n; ++i)
      if (i % k) beam_scores[i] = kNegInf;
  std::vector<double> sample_scores(size_t(n), 0.0);
  const auto is_stop = [&](int64_t t) {
    return std::find(o.stop_tokens().begin(), o.stop_tokens().end(), t) != o.stop_tokens().end();
  };

  for (int64_t step = 0; step < budget; ++step) {
    auto scores = constrain(logits.to(torch::kCPU, torch::kDouble), h, budget - step);  // [N, V]
    std::vector<int64_t> chosen(size_t(n), -1);
    if (k == 1) {
      auto next = pick_next(scores, o, generator);
      auto logp = scores.log_softmax(-1);
      auto next_acc = next.accessor<int64_t, 1>();
      auto logp_acc = logp.accessor<double, 2>();
      for (int64_t i = 0; i < n; ++i) {
        if (h.finished[size_t(i)]) continue;
        chosen[size_t(i)] = next_acc[i];
        sample_scores[size_t(i)] += logp_acc[i][chosen[size_t(i)]];
      }
    } else {
      auto [src, picked] = beam_step(scores, beam_scores, h, k, o.pad_id());
      chosen = std::move(picked);
      runner.select(src.to(prompt.embeds.device()));
    }
    std::vector<int64_t> feed(size_t(n), o.pad_id());
    std::vector<int64_t> feed_pad(size_t(n), 1);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = chosen[size_t(i)];
      if (c < 0) continue;
      h.tokens[size_t(i)].push_back(c);
      ++h.lengths[size_t(i)];
      if (!h.constraints.empty()) h.constraints[size_t(i)]->advance(c);
      feed[size_t(i)] = c;
      feed_pad[size_t(i)] = 0;
      if (is_stop(c)) h.finished[size_t(i)] = 1;
    }
    bool keep_going = true;
    if (callback) {
      // Beam search reports the tokens of beam 0 of each sample.
      std::vector<int64_t> report;
      for (int64_t i = 0; i < n; i += k) report.push_back(chosen[size_t(i)]);
      keep_going = callback(report);
    }
    if (!keep_going || std::all_of(h.finished.begin(), h.finished.end(), [](char f) { return f != 0; })) break;
    if (step + 1 == budget) break;
    logits = runner.step(torch::tensor(feed, torch::kLong), torch::tensor(feed_pad, torch::kLong).to(torch::kBool));
  }
  return best_hypotheses(h, beam_scores, sample_scores, batch, k, o.length_penalty());
}
}  // namespace vlmkit
