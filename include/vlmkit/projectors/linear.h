#pragma once
/// linear: one Linear per token (LLaVA, Liu et al. 2023); N tokens out.
#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct LinearProjectorOptions : ProjectorDims {
  using ProjectorDims::ProjectorDims;
};

/// No fields beyond the widths.
template <class V>
void visit_fields(LinearProjectorOptions&, V&) {}

class LinearProjectorImpl final : public ProjectorBase<LinearProjectorImpl, LinearProjectorOptions> {
 public:
  static constexpr const char* kName = "linear";

  explicit LinearProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override { return rows * cols; }
  Linear fc1{nullptr};
};
TORCH_MODULE(LinearProjector);

}  // namespace vlmkit
