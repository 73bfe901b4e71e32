#pragma once
/// A throwaway projector, added to the test binary exactly as docs/CONTRIBUTING.md
/// says a projector is added (this header, its source with the registry row),
/// so that the generic tests, which iterate the registry, prove they cover a
/// projector nobody wrote a test for: keep every stride-th token, then a Linear.
#include <torch/arg.h>

#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit::test {

struct StridedProjectorOptions {
  StridedProjectorOptions(int64_t in_dim, int64_t out_dim) : in_dim_(in_dim), out_dim_(out_dim) {}
  TORCH_ARG(int64_t, in_dim);
  TORCH_ARG(int64_t, out_dim);
  TORCH_ARG(int64_t, stride) = 3;
};

template <class V>
void visit_fields(StridedProjectorOptions& o, V& v) {
  v("stride", o.stride());
}

class StridedProjectorImpl final : public ProjectorModule {
 public:
  using Options = StridedProjectorOptions;
  static constexpr const char* kName = "test_strided";

  explicit StridedProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  torch::Tensor output_padding_mask(const EncoderOutput& image) const override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override;
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override { return slot_config(*this); }

  Options options;
  Linear proj{nullptr};
};

}  // namespace vlmkit::test
