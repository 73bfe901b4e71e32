// FusedAdamW: AdamW in one fused pass over every parameter (train/optim.h).
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include "../internal.h"
#include "files.h"
#include "vlmkit/models/build.h"
#include "vlmkit/runtime.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/lora.h"
#include "vlmkit/train/trainer.h"

namespace fs = std::filesystem;

namespace vlmkit {
using detail::optimizer_key;

namespace {
struct AdamWScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, root_bias2, eps, neg_step, decay;
};
/// One AdamW update of n floats (the moments, the decay and the step) in one
/// pass; restrict-qualified and branch-free so that it vectorises. The update
/// is memory-bound: AVX-512 and AVX2 clones of it ran no faster
/// (docs/benchmarks.md).
void adamw_update(float* __restrict p, const float* __restrict grad, float* __restrict m, float* __restrict v,
                  int64_t n, const AdamWScalars k) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float mi = m[i] * k.beta1 + k.one_minus_beta1 * g;
    const float vi = v[i] * k.beta2 + k.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * k.decay + k.neg_step * (mi / (std::sqrt(vi) / k.root_bias2 + k.eps));
  }
}
}  // namespace

torch::Tensor FusedAdamW::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure) {
    torch::AutoGradMode enable_grad(true);
    loss = closure();
  }
  auto& states = state();
  // The fused updates of every group, run afterwards as one pass over chunks of
  // all parameters on run_parallel's threads (both cores under either thread
  // policy; per parameter, most tensors are too small to split).
  struct Update {
    float* p;
    const float* g;
    float* m;
    float* v;
    int64_t n;
    AdamWScalars k;
  };
  std::vector<Update> updates;
  for (auto& group : param_groups()) {
    auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
    TORCH_CHECK_VALUE(!o.amsgrad(), "FusedAdamW: amsgrad is not supported; use torch::optim::AdamW");
    const double beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
    const double decay = 1 - o.lr() * o.weight_decay();
    // Parameters the fused CPU pass does not take (CUDA, other dtypes): their
    // update runs as AdamW's sequence over all of them at once (torch's
    // multi-tensor "foreach" kernels: a handful of launches per step on CUDA
    // instead of six per parameter), as torch.optim.AdamW's default does.
    std::vector<torch::Tensor> rest_p, rest_g, rest_m, rest_v;
    std::vector<at::Scalar> rest_step, rest_root;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const auto& grad = p.grad();
      TORCH_CHECK_VALUE(!grad.is_sparse(), "FusedAdamW: sparse gradients are not supported");
      const auto key = optimizer_key<decltype(states)>(p);
      auto it = states.find(key);
      if (it == states.end()) {
        auto fresh = std::make_unique<torch::optim::AdamWParamState>();
        fresh->step(0);
        fresh->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        fresh->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        states[key] = std::move(fresh);
        it = states.find(key);
      }
      auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
      s.step(s.step() + 1);
      const double bias1 = 1 - std::pow(beta1, double(s.step())), bias2 = 1 - std::pow(beta2, double(s.step()));
      const double step_size = o.lr() / bias1;
      auto& m = s.exp_avg();
      auto& v = s.exp_avg_sq();
      const bool fusable = p.device().is_cpu() && p.scalar_type() == torch::kFloat &&
                           grad.scalar_type() == torch::kFloat && p.is_contiguous() && grad.is_contiguous() &&
                           m.is_contiguous() && v.is_contiguous() && m.scalar_type() == torch::kFloat &&
                           v.scalar_type() == torch::kFloat;
      if (!fusable) {
        rest_p.push_back(p);
        rest_g.push_back(grad);
        rest_m.push_back(m);
        rest_v.push_back(v);
        rest_step.emplace_back(-step_size);
        rest_root.emplace_back(std::sqrt(bias2));
        continue;
      }
      const AdamWScalars k{float(beta1), float(beta2), float(1 - beta1), float(1 - beta2), float(std::sqrt(bias2)),
                           float(o.eps()), float(-step_size), o.weight_decay() != 0 ? float(decay) : 1.0f};
      updates.push_back({p.data_ptr<float>(), grad.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                         p.numel(), k});
    }
    if (rest_p.empty()) continue;
    if (o.weight_decay() != 0) at::_foreach_mul_(rest_p, decay);
    at::_foreach_mul_(rest_m, beta1);
    at::_foreach_add_(rest_m, rest_g, 1 - beta1);
    at::_foreach_mul_(rest_v, beta2);
    at::_foreach_addcmul_(rest_v, rest_g, rest_g, 1 - beta2);
    auto denom = at::_foreach_sqrt(rest_v);
    at::_foreach_div_(denom, rest_root);
    at::_foreach_add_(denom, o.eps());
    at::_foreach_addcdiv_(rest_p, rest_m, denom, rest_step);
  }
  constexpr int64_t kChunk = int64_t(1) << 14;
  std::vector<std::pair<size_t, int64_t>> chunks;  // (update, first element)
  int64_t elements = 0;
  for (size_t i = 0; i < updates.size(); ++i) {
    elements += updates[i].n;
    for (int64_t b = 0; b < updates[i].n; b += kChunk) chunks.emplace_back(i, b);
  }
  // Below a few chunks of work, waking a second thread costs more than it saves.
  // On OpenMP's team under the bf16 policy, on the sleeping pool under fp32's
  // (detail::parallel_units). The small VLM's bf16 step at batch 32 with the update
  // on the pool against the team, in one process: 107.2 -> 98.8 and 114.4 -> 107.7
  // ms (the update itself 6.3 -> 3.5 ms; docs/benchmarks.md, "bf16 at batch 32:
  // where the step goes").
  detail::parallel_units(static_cast<int64_t>(chunks.size()), elements >= 4 * kChunk ? compute_threads() : 1,
                         [&](int64_t c) {
    const auto& u = updates[chunks[size_t(c)].first];
    const int64_t b = chunks[size_t(c)].second, n = std::min(kChunk, u.n - b);
    adamw_update(u.p + b, u.g + b, u.m + b, u.v + b, n, u.k);
  });
  return loss;
}
}  // namespace vlmkit
