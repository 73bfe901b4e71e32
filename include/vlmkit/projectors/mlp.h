#pragma once
/// mlp: Linear-GELU-Linear per token (LLaVA-1.5); N tokens out.
#include <torch/arg.h>

#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct MlpProjectorOptions {
  MlpProjectorOptions(int64_t in_dim, int64_t out_dim) : in_dim_(in_dim), out_dim_(out_dim) {}
  TORCH_ARG(int64_t, in_dim);
  TORCH_ARG(int64_t, out_dim);
  /// Hidden width (0 = out_dim).
  TORCH_ARG(int64_t, hidden_dim) = 0;
};

template <class V>
void visit_fields(MlpProjectorOptions& o, V& v) {
  v("hidden_dim", o.hidden_dim());
}

class MlpProjectorImpl final : public ProjectorModule {
 public:
  using Options = MlpProjectorOptions;
  static constexpr const char* kName = "mlp";

  explicit MlpProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override { return rows * cols; }
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override { return slot_config(*this); }

  Options options;
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(MlpProjector);

}  // namespace vlmkit
