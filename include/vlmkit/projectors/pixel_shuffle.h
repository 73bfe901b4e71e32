#pragma once
/// pixel_shuffle: space-to-depth by r, then a Linear (nanoVLM / Idefics3):
/// each r x r block of tokens becomes one token of r^2 * in_dim features;
/// N / r^2 tokens out (the grid's sides divisible by r).
#include <torch/arg.h>

#include "vlmkit/modules/linear.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct PixelShuffleProjectorOptions {
  PixelShuffleProjectorOptions(int64_t in_dim, int64_t out_dim) : in_dim_(in_dim), out_dim_(out_dim) {}
  TORCH_ARG(int64_t, in_dim);
  TORCH_ARG(int64_t, out_dim);
  /// The space-to-depth factor r (r^2 fewer tokens).
  TORCH_ARG(int64_t, factor) = 2;
};

template <class V>
void visit_fields(PixelShuffleProjectorOptions& o, V& v) {
  v("factor", o.factor());
}

class PixelShuffleProjectorImpl final : public ProjectorModule {
 public:
  using Options = PixelShuffleProjectorOptions;
  static constexpr const char* kName = "pixel_shuffle";

  explicit PixelShuffleProjectorImpl(Options options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  /// A merged token is padding when its whole r x r block is.
  torch::Tensor output_padding_mask(const EncoderOutput& image) const override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override;
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override { return slot_config(*this); }

  Options options;
  Linear proj{nullptr};
};
TORCH_MODULE(PixelShuffleProjector);

}  // namespace vlmkit
