#pragma once
/// The norm of every vlmkit block: LayerNorm (parameters `weight`, `bias`, the
/// names torch::nn::LayerNorm uses, so checkpoints are unchanged) or RMSNorm
/// (`weight` only): y = x / sqrt(mean(x^2) + eps) * weight, computed in float32
/// for half-precision inputs.
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

  int64_t dim;
  NormType type;
  double eps;
  torch::Tensor weight, bias;  // bias: LayerNorm only
};
TORCH_MODULE(Norm);

}  // namespace vlmkit
