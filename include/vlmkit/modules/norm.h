#pragma once
/// The norm of every vlmkit block: LayerNorm (parameters `weight`, `bias`, the
/// names torch::nn::LayerNorm uses, so checkpoints are unchanged) or RMSNorm
/// (`weight` only): y = x / sqrt(mean(x^2) + eps) * weight, computed in float32
/// for half-precision inputs. On CPU, RMSNorm runs the fused kernel of
/// kernels/norm.h (one pass forward and backward) unless norm_kernel() is "aten".
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include "vlmkit/options/attention.h"

namespace vlmkit {

class NormImpl : public torch::nn::Cloneable<NormImpl> {
 public:
  NormImpl(int64_t dim, NormType type = NormType::layernorm, double eps = 1e-5);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x);
  /// forward(x) returned in `dtype` (the fused RMSNorm writes it directly,
  /// without the float32 tensor and cast that forward(x).to(dtype) makes under
  /// autocast).
  torch::Tensor forward(const torch::Tensor& x, torch::ScalarType dtype);

  int64_t dim;
  NormType type;
  double eps;
  torch::Tensor weight, bias;  // bias: LayerNorm only
};
TORCH_MODULE(Norm);

}  // namespace vlmkit
