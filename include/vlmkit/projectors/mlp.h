#pragma once
/// mlp: Linear-GELU-Linear per token (LLaVA-1.5); N tokens out.
#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct MlpProjectorOptions : ProjectorDims {
  using ProjectorDims::ProjectorDims;
  /// Hidden width (0 = out_dim).
  TORCH_ARG(int64_t, hidden_dim) = 0;
};

template <class V>
void visit_fields(MlpProjectorOptions& o, V& v) {
  v("hidden_dim", o.hidden_dim());
}

class MlpProjectorImpl final : public ProjectorBase<MlpProjectorImpl, MlpProjectorOptions> {
 public:
  static constexpr const char* kName = "mlp";

  explicit MlpProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override { return rows * cols; }

  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(MlpProjector);

}  // namespace vlmkit
