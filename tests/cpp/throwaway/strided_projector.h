#pragma once
/// A throwaway projector, added to the test binary exactly as docs/CONTRIBUTING.md
/// says a projector is added (this header, its source with the registry row),
/// so that the generic tests, which iterate the registry, prove they cover a
/// projector nobody wrote a test for: keep every stride-th token, then a Linear.
#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit::test {

struct StridedProjectorOptions : ProjectorDims {
  using ProjectorDims::ProjectorDims;
  TORCH_ARG(int64_t, stride) = 3;
};

template <class V>
void visit_fields(StridedProjectorOptions& o, V& v) {
  v("stride", o.stride());
}

class StridedProjectorImpl final : public ProjectorBase<StridedProjectorImpl, StridedProjectorOptions> {
 public:
  static constexpr const char* kName = "test_strided";

  explicit StridedProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  torch::Tensor output_padding_mask(const EncoderOutput& image) const override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override;

  Linear proj{nullptr};
};

}  // namespace vlmkit::test
