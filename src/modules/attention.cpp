// MultiheadAttention (modules/attention.h).
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <map>

#include <numeric>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/detail/autocast.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/kernels/attention.h"
#include "vlmkit/kernels/gemm.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
MultiheadAttentionImpl::MultiheadAttentionImpl(MultiheadAttentionOptions options_)
    : options(std::move(options_)) {
  reset();
}

void MultiheadAttentionImpl::reset() {
  detail::check_heads(options.embed_dim(), options.num_heads(), "MultiheadAttention");
  TORCH_CHECK_VALUE(options.dropout() >= 0 && options.dropout() < 1,
                    "MultiheadAttention: dropout must be in [0, 1), got ", options.dropout());
  TORCH_CHECK_VALUE(!options.rotary() || (options.embed_dim() / options.num_heads()) % 2 == 0,
                    "MultiheadAttention: rotary positions need an even head width, got ",
                    options.embed_dim() / options.num_heads());
  const int64_t e = options.embed_dim();
  const int64_t c = options.context_dim() > 0 ? options.context_dim() : e;
  TORCH_CHECK_VALUE(options.num_kv_heads() >= 0, "MultiheadAttention: num_kv_heads must be >= 0 (0: num_heads), got ",
                    options.num_kv_heads());
  const int64_t kv = kv_heads();
  TORCH_CHECK_VALUE(options.num_heads() % kv == 0, "MultiheadAttention: num_kv_heads (", kv,
                    ") must divide num_heads (", options.num_heads(), ")");
  const int64_t kv_dim = kv * (e / options.num_heads());
  q_proj = register_module("q_proj", Linear(torch::nn::LinearOptions(e, e).bias(options.bias())));
  k_proj = register_module("k_proj", Linear(torch::nn::LinearOptions(c, kv_dim).bias(options.bias())));
  v_proj = register_module("v_proj", Linear(torch::nn::LinearOptions(c, kv_dim).bias(options.bias())));
  out_proj = register_module("out_proj", Linear(torch::nn::LinearOptions(e, e).bias(options.bias())));
  if (options.qk_norm()) {
    q_norm = register_module("q_norm", Norm(e / options.num_heads(), NormType::rmsnorm, 1e-6));
    k_norm = register_module("k_norm", Norm(e / options.num_heads(), NormType::rmsnorm, 1e-6));
  }
}

void MultiheadAttentionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::MultiheadAttention", options_to_json(options));
}

torch::Tensor MultiheadAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context,
                                              const torch::Tensor& key_padding_mask,
                                              const torch::Tensor& attn_mask, bool causal,
                                              KVCache* cache, const torch::Tensor& positions) {
  const int64_t e = options.embed_dim(), h = options.num_heads(), dh = e / h;
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 3 && x.size(2) == e,
                    "MultiheadAttention: expected x of shape [B, T, ", e, "], got ",
                    x.defined() ? detail::shape_str(x) : std::string("undefined"));
  const int64_t b = x.size(0), t = x.size(1), kv = kv_heads();
  const bool cross = context.defined();
  auto q = q_proj->forward(x).view({b, t, h, dh});
  // Under autocast the norms compute in float32 (modules/norm.cpp); q and k come
  // back in the projections' dtype, so that q, k and v agree and the mask is built
  // in the scores' dtype. They normalise [B, T, H, Dh] before the transpose, where
  // the rows are contiguous.
  if (q_norm) q = q_norm->forward(q, q.scalar_type());
  q = q.transpose(1, 2);  // [B, H, T, Dh]
  torch::Tensor k, v;
  if (cross && cache && !cache->empty()) {
    k = cache->key;
    v = cache->value;
  } else {
    const auto& source = cross ? context : x;
    if (cross) {
      const int64_t c = options.context_dim() > 0 ? options.context_dim() : e;
      TORCH_CHECK_VALUE(context.dim() == 3 && context.size(0) == b && context.size(2) == c,
                        "MultiheadAttention: expected context of shape [", b, ", S, ", c,
                        "], got ", detail::shape_str(context));
    }
    const int64_t s = source.size(1);
    k = k_proj->forward(source).view({b, s, kv, dh});
    if (k_norm) k = k_norm->forward(k, k.scalar_type());
    k = k.transpose(1, 2);  // [B, Hkv, S, Dh]
    v = v_proj->forward(source).view({b, s, kv, dh}).transpose(1, 2);
    if (options.rotary() && !cross) {
      torch::Tensor pos = positions;
      if (!pos.defined()) {
        const int64_t past = cache ? cache->length() : 0;
        pos = torch::arange(past, past + t, torch::TensorOptions().dtype(torch::kLong).device(x.device()))
                  .unsqueeze(0)
                  .expand({b, t});
      }
      TORCH_CHECK_VALUE(pos.dim() == 2 && pos.size(0) == b && pos.size(1) == t,
                        "MultiheadAttention: expected positions of shape [", b, ", ", t, "], got ",
                        detail::shape_str(pos));
      q = detail::apply_rotary(q, pos, options.rope_theta());
      k = detail::apply_rotary(k, pos, options.rope_theta());
    }
    if (cache && cross) {  // the context's keys and values, kept for later steps
      cache->key = k;
      cache->value = v;
    } else if (cache) {
      cache->append(k, v);
      k = cache->key;
      v = cache->value;
    }
  }
  const int64_t s = k.size(2);
  const int64_t past = cross ? 0 : s - t;
  if (kv != h) {  // grouped-query: each key/value head serves h / kv query heads
    k = k.repeat_interleave(h / kv, 1);
    v = v.repeat_interleave(h / kv, 1);
  }

  if (key_padding_mask.defined()) {
    TORCH_CHECK_TYPE(key_padding_mask.scalar_type() == torch::kBool,
                     "MultiheadAttention: expected key_padding_mask of dtype bool, got ",
                     key_padding_mask.scalar_type());
    TORCH_CHECK_VALUE(key_padding_mask.dim() == 2 && key_padding_mask.size(0) == b &&
                          key_padding_mask.size(1) == s,
                      "MultiheadAttention: expected key_padding_mask of shape [", b, ", ", s,
                      "], got ", detail::shape_str(key_padding_mask));
  }
  if (attn_mask.defined()) {
    TORCH_CHECK_TYPE(attn_mask.scalar_type() == torch::kBool || attn_mask.is_floating_point(),
                     "MultiheadAttention: expected attn_mask of dtype bool (true = blocked) or floating (added "
                     "to the scores), got ", attn_mask.scalar_type());
    TORCH_CHECK_VALUE((attn_mask.dim() == 2 && attn_mask.size(0) == t && attn_mask.size(1) == s) ||
                          (attn_mask.dim() == 3 && attn_mask.size(0) == b &&
                           attn_mask.size(1) == t && attn_mask.size(2) == s),
                      "MultiheadAttention: expected attn_mask of shape [", t, ", ", s, "] or [",
                      b, ", ", t, ", ", s, "], got ", detail::shape_str(attn_mask));
  }
  const auto additive =
      detail::attention_bias(key_padding_mask, attn_mask, causal, t, s, past, q.scalar_type(), q.device());

  const double dropout_p = is_training() ? options.dropout() : 0.0;
  torch::Tensor out;
  // CPU: the fused kernel (kernels/attention.h) where attention_kernel() picks
  // it and the inputs qualify; its output is already laid out [B, T, H, Dh].
  if (dropout_p == 0 && q.device().is_cpu() && kernels::use_fused_attention(q, s, additive) &&
      kernels::fused_attention_unsupported(q, k, v, additive).empty()) {
    out = kernels::fused_attention(q, k, v, additive, 1.0 / std::sqrt(double(dh)));
    return out_proj->forward(out.transpose(1, 2).reshape({b, t, e}));
  }
#if TORCH_VERSION_MAJOR >= 2
  // An undefined tensor is not "no mask" for SDPA: pass an empty optional.
  out = at::scaled_dot_product_attention(q, k, v,
                                         additive.defined() ? c10::optional<torch::Tensor>(additive) : c10::nullopt,
                                         dropout_p, false);
#else
  // The scale goes on q ([T, Dh]) rather than on the scores ([T, S]), and the
  // mask is added in place: two passes over [B, H, T, S] fewer.
  // kernels::matmul: oneDNN's sgemm per head in float32 on CPU, else at::matmul.
  auto scores = kernels::matmul(q * (1.0 / std::sqrt(double(dh))), k.transpose(-2, -1));
  if (additive.defined()) scores.add_(additive);
  auto weights = scores.softmax(-1);
  if (dropout_p > 0) weights = F::dropout(weights, F::DropoutFuncOptions().p(dropout_p).training(true));
  out = kernels::matmul(weights, v);
#endif
  return out_proj->forward(out.transpose(1, 2).reshape({b, t, e}));
}
}  // namespace vlmkit
