#pragma once
/// Projectors (connectors): image-encoder tokens -> decoder-width tokens.
///
/// | name          | reference                          | tokens out (N in, grid h x w) |
/// |---------------|------------------------------------|-------------------------------|
/// | linear        | LLaVA (Liu et al. 2023)            | N                             |
/// | mlp           | LLaVA-1.5: Linear-GELU-Linear      | N                             |
/// | pixel_shuffle | nanoVLM / Idefics3, factor r       | N / r^2 (h, w divisible by r) |
/// | patch_merger  | Qwen2-VL: LN, merge 2x2, MLP       | N / 4 (h, w even)             |
/// | resampler     | Perceiver resampler / Q-Former     | num_queries (any N)           |
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/normalization.h>

#include "vlmkit/modules/encoder.h"
#include "vlmkit/modules/linear.h"
#include "vlmkit/modules/transformer.h"
#include "vlmkit/options/decoder.h"

namespace vlmkit {

/// The projector slot contract.
class ProjectorModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  /// image.tokens [B, N, in_dim] (with image.grid) -> [B, M, out_dim].
  virtual torch::Tensor forward(const EncoderOutput& image) = 0;
  /// M for an input of N tokens on a rows x cols grid.
  virtual int64_t num_output_tokens(int64_t rows, int64_t cols) const = 0;
  /// [B, M] bool (true = padding) for the output tokens, given the input's
  /// padding_mask (variable-size images); undefined when nothing is padded.
  /// The default (per-token projectors) passes the input mask through.
  virtual torch::Tensor output_padding_mask(const EncoderOutput& image) const { return image.padding_mask; }
  virtual int64_t input_dim() const = 0;
  virtual int64_t output_dim() const = 0;
  virtual nlohmann::json config() const = 0;
  /// name(in_dim=..., out_dim=..., <config fields>), shared by all projectors.
  void pretty_print(std::ostream& stream) const override;
};

/// linear and mlp: a per-token map; N tokens out.
class MlpProjectorImpl final : public ProjectorModule {
 public:
  MlpProjectorImpl(ProjectorOptions options_, bool hidden_layer);
  torch::Tensor forward(const EncoderOutput& image) override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override { return rows * cols; }
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override;

  ProjectorOptions options;
  bool hidden_layer;
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(MlpProjector);

/// Space-to-depth by r: each r x r block of tokens becomes one token of
/// r^2 * in_dim features, then a Linear; r^2 fewer tokens.
class PixelShuffleProjectorImpl final : public ProjectorModule {
 public:
  explicit PixelShuffleProjectorImpl(ProjectorOptions options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  /// A merged token is padding when its whole r x r block is.
  torch::Tensor output_padding_mask(const EncoderOutput& image) const override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override;
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override;

  ProjectorOptions options;
  Linear proj{nullptr};
};
TORCH_MODULE(PixelShuffleProjector);

/// Qwen2-VL's patch merger: LayerNorm, concatenate each 2x2 neighbourhood,
/// then Linear(4D, 4D) - GELU - Linear(4D, out).
class PatchMergerProjectorImpl final : public ProjectorModule {
 public:
  explicit PatchMergerProjectorImpl(ProjectorOptions options_);
  torch::Tensor forward(const EncoderOutput& image) override;
  torch::Tensor output_padding_mask(const EncoderOutput& image) const override;
  int64_t num_output_tokens(int64_t rows, int64_t cols) const override;
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override;

  ProjectorOptions options;
  Norm norm{nullptr};
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(PatchMergerProjector);

/// num_queries learned queries; each layer: self-attention among queries,
/// cross-attention to the (linearly mapped) image tokens, MLP. Output length
/// is num_queries whatever the image size.
class ResamplerProjectorImpl final : public ProjectorModule {
 public:
  explicit ResamplerProjectorImpl(ProjectorOptions options_);
  /// Padded image tokens are masked out of the cross-attention.
  torch::Tensor forward(const EncoderOutput& image) override;
  /// The queries are never padding: undefined.
  torch::Tensor output_padding_mask(const EncoderOutput&) const override { return {}; }
  int64_t num_output_tokens(int64_t, int64_t) const override { return options.num_queries(); }
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override;

  ProjectorOptions options;
  torch::Tensor queries;  // [1, Q, out_dim]
  torch::nn::ModuleList blocks{nullptr};
  Norm norm{nullptr};
};
TORCH_MODULE(ResamplerProjector);

std::shared_ptr<ProjectorModule> make_projector(ProjectorType type, const ProjectorOptions& options);

}  // namespace vlmkit
