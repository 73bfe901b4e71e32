#pragma once
/// resampler: a Perceiver resampler / Q-Former: num_queries learned queries;
/// each layer is self-attention among the queries, cross-attention to the
/// image tokens, MLP. num_queries tokens out, whatever the image size.
#include <torch/arg.h>
#include <torch/nn/modules/container/modulelist.h>

#include "vlmkit/modules/norm.h"
#include "vlmkit/projectors/projector.h"

namespace vlmkit {

struct ResamplerProjectorOptions : ProjectorDims {
  using ProjectorDims::ProjectorDims;
  /// Learned queries (= output tokens), layers, attention heads.
  TORCH_ARG(int64_t, num_queries) = 16;
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(int64_t, num_heads) = 4;
};

template <class V>
void visit_fields(ResamplerProjectorOptions& o, V& v) {
  v("num_queries", o.num_queries());
  v("num_layers", o.num_layers());
  v("num_heads", o.num_heads());
}

class ResamplerProjectorImpl final : public ProjectorBase<ResamplerProjectorImpl, ResamplerProjectorOptions> {
 public:
  static constexpr const char* kName = "resampler";

  explicit ResamplerProjectorImpl(Options options_);
  /// Padded image tokens are masked out of the cross-attention.
  torch::Tensor forward(const EncoderOutput& image) override;
  /// The queries are never padding: undefined.
  torch::Tensor output_padding_mask(const EncoderOutput&) const override { return {}; }
  int64_t num_output_tokens(int64_t, int64_t) const override { return options.num_queries(); }
  std::array<int64_t, 2> output_grid(int64_t, int64_t) const override { return {0, 0}; }

  torch::Tensor queries;  // [1, Q, out_dim]
  torch::nn::ModuleList blocks{nullptr};
  Norm norm{nullptr};
};
TORCH_MODULE(ResamplerProjector);

}  // namespace vlmkit
