#pragma once
/// Task heads.
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/dropout.h>

#include "vlmkit/modules/linear.h"
#include "vlmkit/options/models.h"

namespace vlmkit {

/// Linear, or Linear -> GELU -> Dropout -> Linear when hidden_dim > 0.
/// Shape: [B, in_dim] -> [B, num_classes].
class ClassificationHeadImpl : public torch::nn::Cloneable<ClassificationHeadImpl> {
 public:
  explicit ClassificationHeadImpl(ClassificationHeadOptions options_ = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x);

  ClassificationHeadOptions options;
  Linear hidden{nullptr}, out{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(ClassificationHead);

}  // namespace vlmkit
