#pragma once
/// linear: one Linear per token (LLaVA, Liu et al. 2023); N tokens out.
#include <torch/arg.h>

#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct LinearProjectorOptions {
  LinearProjectorOptions(int64_t in_dim, int64_t out_dim) : in_dim_(in_dim), out_dim_(out_dim) {}
  TORCH_ARG(int64_t, in_dim);
  TORCH_ARG(int64_t, out_dim);
};

/// No fields beyond the widths.
template <class V>
void visit_fields(LinearProjectorOptions&, V&) {}

class LinearProjectorImpl final : public ProjectorModule {
 public:
  using Options = LinearProjectorOptions;
  static constexpr const char* kName = "linear";

  explicit LinearProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override { return rows * cols; }
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override { return slot_config(*this); }

  Options options;
  Linear fc1{nullptr};
};
TORCH_MODULE(LinearProjector);

}  // namespace vlmkit
