#pragma once
/// patch_merger: Qwen2-VL's merger: LayerNorm, concatenate each 2x2
/// neighbourhood, then Linear(4D, 4D) - GELU - Linear(4D, out); N / 4 tokens
/// out (the grid's sides even).
#include "vlmkit/modules/linear.h"
#include "vlmkit/modules/norm.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct PatchMergerProjectorOptions : ProjectorDims {
  using ProjectorDims::ProjectorDims;
};

/// No fields beyond the widths.
template <class V>
void visit_fields(PatchMergerProjectorOptions&, V&) {}

class PatchMergerProjectorImpl final : public ProjectorBase<PatchMergerProjectorImpl, PatchMergerProjectorOptions> {
 public:
  static constexpr const char* kName = "patch_merger";

  explicit PatchMergerProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  torch::Tensor output_padding_mask(const EncoderOutput& image) const override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override;
  std::array<int64_t, 2> output_grid(int64_t rows, int64_t cols) const override {
    return {rows / 2, cols / 2};
  }

  Norm norm{nullptr};
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(PatchMergerProjector);

}  // namespace vlmkit
