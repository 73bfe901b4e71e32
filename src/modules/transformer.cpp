// The pre-norm transformer block (modules/transformer.h).
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <map>

#include <numeric>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/detail/autocast.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/kernels/mlp.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
namespace {
// The fused GELU MLP (kernels/mlp.h) computes fc2(gelu(fc1(n))) with neither
// dropout between them nor a LoRA adapter's extra path.
bool use_fused_mlp(const TransformerBlockImpl& block, const torch::Tensor& n) {
  if (!n.device().is_cpu() || mlp_kernel() != "auto") return false;
  if (block.is_training() && block.options.dropout() > 0) return false;
  for (const auto* fc : {&block.fc1, &block.fc2})
    if ((*fc)->has_lora() && !(*fc)->merged()) return false;
  const auto s = n.scalar_type();
  return s == torch::kFloat || s == torch::kDouble || s == torch::kBFloat16;
}
}  // namespace

TransformerBlockImpl::TransformerBlockImpl(TransformerBlockOptions options_)
    : options(std::move(options_)) {
  reset();
}

void TransformerBlockImpl::reset() {
  const int64_t d = options.d_model();
  detail::check_heads(d, options.num_heads(), "TransformerBlock");
  TORCH_CHECK_VALUE(options.mlp_ratio() > 0, "TransformerBlock: mlp_ratio must be positive, got ",
                    options.mlp_ratio());
  TORCH_CHECK_VALUE(options.dropout() >= 0 && options.dropout() < 1,
                    "TransformerBlock: dropout must be in [0, 1), got ", options.dropout());
  norm1 = register_module("norm1", Norm(d, options.norm(), options.norm_eps()));
  self_attn = register_module(
      "self_attn",
      MultiheadAttention(MultiheadAttentionOptions(d, options.num_heads())
                             .dropout(options.dropout())
                             .rotary(options.rotary())
                             .rope_theta(options.rope_theta())
                             .num_kv_heads(options.num_kv_heads())
                             .qk_norm(options.qk_norm())));
  if (options.cross_attention()) {
    norm_cross = register_module("norm_cross", Norm(d, options.norm(), options.norm_eps()));
    cross_attn = register_module(
        "cross_attn", MultiheadAttention(MultiheadAttentionOptions(d, options.num_heads())
                                             .context_dim(options.context_dim())
                                             .dropout(options.dropout())
                                             .qk_norm(options.qk_norm())));
    if (options.gated_cross_attention())
      cross_gate = register_parameter("cross_gate", torch::zeros({1}));
  }
  norm2 = register_module("norm2", Norm(d, options.norm(), options.norm_eps()));
  const auto hidden = static_cast<int64_t>(std::llround(d * options.mlp_ratio()));
  if (options.mlp() == MlpType::swiglu) {
    const auto no_bias = [](int64_t in, int64_t out) { return Linear(torch::nn::LinearOptions(in, out).bias(false)); };
    gate_proj = register_module("gate_proj", no_bias(d, hidden));
    up_proj = register_module("up_proj", no_bias(d, hidden));
    down_proj = register_module("down_proj", no_bias(hidden, d));
  } else {
    fc1 = register_module("fc1", Linear(d, hidden));
    fc2 = register_module("fc2", Linear(hidden, d));
  }
  dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
  detail::init_transformer_weights(*this);
}

void TransformerBlockImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::TransformerBlock", options_to_json(options));
}

torch::Tensor TransformerBlockImpl::forward(const torch::Tensor& x,
                                            const torch::Tensor& key_padding_mask,
                                            const torch::Tensor& attn_mask, bool causal,
                                            const torch::Tensor& context,
                                            const torch::Tensor& context_padding_mask,
                                            BlockCache* cache, const torch::Tensor& positions) {
  auto h = x + dropout->forward(self_attn->forward(norm1->forward(x), {}, key_padding_mask,
                                                   attn_mask, causal,
                                                   cache ? &cache->self : nullptr, positions));
  if (options.cross_attention()) {
    TORCH_CHECK_VALUE(context.defined(),
                      "TransformerBlock: this block has cross-attention and needs a context of "
                      "shape [B, N, D]");
    // [B, T, N]: a per-query mask (packed rows), else [B, N] key padding.
    const bool per_query = context_padding_mask.defined() && context_padding_mask.dim() == 3;
    auto c = cross_attn->forward(norm_cross->forward(h), context, per_query ? torch::Tensor() : context_padding_mask,
                                 per_query ? context_padding_mask : torch::Tensor(), false,
                                 cache ? &cache->cross : nullptr);
    if (cross_gate.defined()) c = torch::tanh(cross_gate) * c;
    h = h + dropout->forward(c);
  }
  const auto n = norm2->forward(h);
  if (options.mlp() == MlpType::gelu && use_fused_mlp(*this, n)) {
    auto m = kernels::fused_gelu_mlp(n, fc1->weight, fc1->bias, fc2->weight, fc2->bias);
    return h + dropout->forward(m);
  }
  auto m = options.mlp() == MlpType::swiglu
               ? down_proj->forward(dropout->forward(torch::silu(gate_proj->forward(n)) * up_proj->forward(n)))
               : fc2->forward(dropout->forward(torch::gelu(fc1->forward(n))));
  return h + dropout->forward(m);
}
}  // namespace vlmkit
