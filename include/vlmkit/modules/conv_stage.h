#pragma once
/// The conv stage: a small CNN stem whose feature map becomes a token grid.
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/normalization.h>

#include "vlmkit/modules/encoder.h"
#include "vlmkit/modules/norm.h"
#include "vlmkit/options/image_encoder.h"

namespace vlmkit {

namespace detail {
/// torch::nn::GroupNorm that normalises bf16 activations in its weights'
/// precision under CPU autocast (LibTorch 1.13's autocast leaves group_norm out).
class GroupNormImpl : public torch::nn::GroupNormImpl {
 public:
  using torch::nn::GroupNormImpl::GroupNormImpl;
  torch::Tensor forward(const torch::Tensor& input);
  /// gelu(forward(input)): on CPU, by the fused kernel (kernels/norm.h,
  /// group_norm_gelu) when norm_kernel() is "auto", in the input's dtype (bf16
  /// under autocast, for the next convolution); else GroupNorm then GELU.
  torch::Tensor forward_gelu(const torch::Tensor& input);
  /// Whether forward_gelu runs the fused kernel for this input.
  bool fuses(const torch::Tensor& input) const;
};
TORCH_MODULE(GroupNorm);
}  // namespace detail

/// Stride-2 3x3 convolutions (GroupNorm + GELU after each), then a linear map
/// (1x1 convolution) of each feature-map cell to d_model and a LayerNorm. As an image encoder
/// the pooled vector is the mean of the tokens.
///
/// Shape: images [B, C, H, W] -> tokens [B, (H/s)*(W/s), d_model] with
/// s = 2^len(channels); H and W must be multiples of s.
///
/// Example:
///   ConvStage stem(ConvStageOptions().channels({32, 64}).d_model(96));
///   auto out = stem->forward(torch::rand({2, 3, 64, 64}));  // tokens [2, 256, 96]
class ConvStageImpl final : public ImageEncoderModule {
 public:
  using Options = ConvStageOptions;
  static constexpr const char* kName = "conv";

  explicit ConvStageImpl(ConvStageOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;

  using ImageEncoderModule::forward;  // variable sizes: refused (GroupNorm statistics would include padding)
  EncoderOutput forward(const torch::Tensor& images) override;
  /// Feature map [B, C_last, H/s, W/s] before the token projection.
  torch::Tensor features(const torch::Tensor& images);
  int64_t output_dim() const override { return options.d_model(); }
  int64_t downsample() const { return int64_t{1} << options.channels().size(); }
  nlohmann::json config() const override { return slot_config(*this); }

  ConvStageOptions options;
  torch::nn::Sequential stages{nullptr};
  torch::nn::Conv2d proj{nullptr};  // 1x1: a per-cell linear map
  Norm norm{nullptr};
};
TORCH_MODULE(ConvStage);

}  // namespace vlmkit
