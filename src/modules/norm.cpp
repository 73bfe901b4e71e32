// LayerNorm / RMSNorm / GroupNorm (modules/norm.h).
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <map>

#include <numeric>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/detail/autocast.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/kernels/norm.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
namespace detail {
namespace {
/// Under autocast a norm receives low-precision activations beside its float32
/// weights; LibTorch 1.13's autocast does not cast for layer_norm or group_norm,
/// so normalise in the weights' precision. Outside autocast a dtype mismatch is
/// left to fail as it does in torch.
torch::Tensor in_weight_precision(const torch::Tensor& input, const torch::Tensor& weight) {
  const bool autocast = at::autocast::is_cpu_enabled() || at::autocast::is_enabled();
  return autocast && input.scalar_type() != weight.scalar_type() ? input.to(weight.scalar_type()) : input;
}
}  // namespace

torch::Tensor GroupNormImpl::forward(const torch::Tensor& input) {
  return torch::nn::GroupNormImpl::forward(in_weight_precision(input, weight));
}

bool GroupNormImpl::fuses(const torch::Tensor& input) const {
  const auto s = input.defined() ? input.scalar_type() : c10::ScalarType::Undefined;
  const bool autocast = at::autocast::is_cpu_enabled() || at::autocast::is_enabled();
  // Outside autocast a dtype mismatch fails in ATen's GroupNorm, as in torch.
  const bool dtypes = !weight.defined() || weight.scalar_type() == s || (autocast && weight.scalar_type() == torch::kFloat);
  return norm_kernel() == "auto" && input.defined() && input.device().is_cpu() && input.dim() >= 2 &&
         (s == torch::kFloat || s == torch::kDouble || s == torch::kBFloat16) && dtypes &&
         (!weight.defined() || weight.device().is_cpu());
}

torch::Tensor GroupNormImpl::forward_gelu(const torch::Tensor& input) {
  if (fuses(input)) return kernels::group_norm_gelu(input, options.num_groups(), weight, bias, options.eps());
  return torch::gelu(forward(input));
}
}  // namespace detail

NormImpl::NormImpl(int64_t dim_, NormType type_, double eps_) : dim(dim_), type(type_), eps(eps_) { reset(); }

void NormImpl::reset() {
  TORCH_CHECK_VALUE(dim >= 1, "Norm: dim must be >= 1, got ", dim);
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "Norm: eps must be a positive number, got ", eps);
  weight = register_parameter("weight", torch::ones({dim}));
  if (type == NormType::layernorm) bias = register_parameter("bias", torch::zeros({dim}));
}

void NormImpl::pretty_print(std::ostream& stream) const {
  stream << "vlmkit::Norm(" << to_name(type) << ", " << dim << ", eps=" << eps << ")";
}

torch::Tensor NormImpl::forward(const torch::Tensor& input) { return forward(input, c10::ScalarType::Undefined); }

torch::Tensor NormImpl::forward(const torch::Tensor& input, torch::ScalarType dtype) {
  TORCH_CHECK_VALUE(input.defined() && input.dim() >= 1 && input.size(-1) == dim, "Norm: expected [..., ", dim,
                    "], got ", detail::shape_str(input));
  const bool cast = dtype != c10::ScalarType::Undefined;
  const auto s = input.scalar_type();
  const bool fused = type == NormType::rmsnorm && input.device().is_cpu() && weight.device().is_cpu() &&
                     norm_kernel() == "auto" && (s == torch::kFloat || s == torch::kDouble || s == torch::kBFloat16) &&
                     (weight.scalar_type() == s || weight.scalar_type() == torch::kFloat);
  // The fused kernel reads `input` as it is and normalises it in float32 whatever
  // the autocast state, as the paths below do after in_weight_precision's cast
  // (which it therefore skips: a pass over the input under autocast).
  if (fused) return kernels::rms_norm(input, weight, eps, cast ? c10::optional<torch::ScalarType>(dtype) : c10::nullopt);
  const auto x = detail::in_weight_precision(input, weight);
  if (type == NormType::layernorm) {
    auto y = torch::layer_norm(x, {dim}, weight, bias, eps);
    return cast ? y.to(dtype) : y;
  }
  const bool low = x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16;
  const auto xf = low ? x.to(torch::kFloat) : x;
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  y = (low ? y.to(x.scalar_type()) : y) * weight;
  return cast ? y.to(dtype) : y;
}
}  // namespace vlmkit
