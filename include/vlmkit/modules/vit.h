#pragma once
/// Vision Transformer image encoder.
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>

#include "vlmkit/modules/conv_stage.h"
#include "vlmkit/modules/transformer.h"

namespace vlmkit {

/// ViT (Dosovitskiy et al. 2020): patch embedding (or the conv stage), a CLS
/// token when pooling by CLS, learned or fixed 2D sin-cos positions (MAE,
/// He et al. 2021), pre-norm blocks and a final norm; pooled output from a CLS token, the
/// token mean, or SigLIP's attention-pooling head (pool "map").
///
/// Shape: images [B, C, H, W], H and W multiples of patch_size ->
///   tokens [B, (H/p)*(W/p), d_model] (patches only), pooled [B, d_model].
///   Learned positions are bicubically interpolated for grids other than
///   image_size/patch_size.
///
/// Example:
///   ViT vit(ViTOptions().image_size(32).patch_size(4).d_model(64).depth(2).num_heads(2));
///   EncoderOutput out = vit->forward(torch::rand({8, 3, 32, 32}));
class ViTImpl final : public ImageEncoderModule {
 public:
  using Options = ViTOptions;
  static constexpr const char* kName = "vit";

  explicit ViTImpl(ViTOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;

  EncoderOutput forward(const torch::Tensor& images) override;
  /// Variable-size images (see ImageEncoderModule): sizes must be multiples of
  /// patch_size; padded patches are masked out of attention and pooling.
  /// Learned positions are interpolated per image size and the conv stem runs
  /// on each size group's unpadded crop, so valid tokens equal the image's own.
  EncoderOutput forward(const torch::Tensor& images, const torch::Tensor& image_sizes) override;
  int64_t output_dim() const override { return options.d_model(); }
  nlohmann::json config() const override { return slot_config(*this); }
  /// Position embeddings for a grid of rows x cols patches: [1, rows*cols, D].
  torch::Tensor patch_positions(int64_t rows, int64_t cols, torch::TensorOptions like);

  ViTOptions options;
  torch::nn::Conv2d patch_embed{nullptr};  // stem == patch
  ConvStage conv_stem{nullptr};            // stem == conv
  torch::Tensor cls_token;                 // [1, 1, D] when pool == cls
  torch::Tensor pos_embed;                 // [1, grid*grid, D] when learned
  torch::Tensor cls_pos;                   // [1, 1, D] learned CLS position
  torch::nn::ModuleList blocks{nullptr};
  Norm norm{nullptr};
  // pool == map (SigLIP's attention-pooling head)
  torch::Tensor pool_probe;  // [1, 1, D]
  MultiheadAttention pool_attn{nullptr};
  Norm pool_norm{nullptr};
  Linear pool_fc1{nullptr}, pool_fc2{nullptr};
};
TORCH_MODULE(ViT);

namespace detail {
/// Fixed 2D sin-cos position table [rows*cols, dim] (MAE), dim % 4 == 0.
torch::Tensor sincos_2d(int64_t rows, int64_t cols, int64_t dim);
/// Validates images [B, C, H, W] of a floating dtype with C == channels.
/// Shape, dtype, finiteness and (with `like`, a parameter) device and dtype of images.
void check_images(const torch::Tensor& images, int64_t channels, const char* who, const torch::Tensor& like = {});
}  // namespace detail

}  // namespace vlmkit
