#pragma once
/// pixel_shuffle: space-to-depth by r, then a Linear (nanoVLM / Idefics3):
/// each r x r block of tokens becomes one token of r^2 * in_dim features;
/// N / r^2 tokens out (the grid's sides divisible by r).
#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct PixelShuffleProjectorOptions : ProjectorDims {
  using ProjectorDims::ProjectorDims;
  /// The space-to-depth factor r (r^2 fewer tokens).
  TORCH_ARG(int64_t, factor) = 2;
};

template <class V>
void visit_fields(PixelShuffleProjectorOptions& o, V& v) {
  v("factor", o.factor());
}

class PixelShuffleProjectorImpl final : public ProjectorBase<PixelShuffleProjectorImpl, PixelShuffleProjectorOptions> {
 public:
  static constexpr const char* kName = "pixel_shuffle";

  explicit PixelShuffleProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  /// A merged token is padding when its whole r x r block is.
  torch::Tensor output_padding_mask(const EncoderOutput& image) const override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override;
  std::array<int64_t, 2> output_grid(int64_t rows, int64_t cols) const override {
    return {rows / options.factor(), cols / options.factor()};
  }

  Linear proj{nullptr};
};
TORCH_MODULE(PixelShuffleProjector);

}  // namespace vlmkit
