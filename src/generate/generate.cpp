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
}  // namespace vlmkit
