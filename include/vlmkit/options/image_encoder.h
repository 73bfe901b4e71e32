#pragma once
/// Options for the image encoders: the ViT and the conv stage.
#include <torch/arg.h>

#include <cstdint>
#include <vector>

#include "vlmkit/detail/enum_names.h"
#include "vlmkit/options/attention.h"

namespace vlmkit {

enum class PosEmbedding { learned, sincos2d };
enum class ImagePool { cls, mean, map };
enum class ViTStem { patch, conv };

VLMKIT_ENUM_NAMES(PosEmbedding, "position embedding", {PosEmbedding::learned, "learned"},
                  {PosEmbedding::sincos2d, "sincos2d"});
VLMKIT_ENUM_NAMES(ImagePool, "image pooling", {ImagePool::cls, "cls"}, {ImagePool::mean, "mean"},
                  {ImagePool::map, "map"});
VLMKIT_ENUM_NAMES(ViTStem, "ViT stem", {ViTStem::patch, "patch"}, {ViTStem::conv, "conv"});

/// Options for the Vision Transformer (Dosovitskiy et al. 2020, "An Image is
/// Worth 16x16 Words").
///
/// Example:
///   ViT vit(ViTOptions().image_size(64).patch_size(8).d_model(128).depth(4));
struct ViTOptions {
  /// Side of the square training image; with learned positions other sizes
  /// (multiples of patch_size) are served by interpolating the position table.
  TORCH_ARG(int64_t, image_size) = 64;
  TORCH_ARG(int64_t, patch_size) = 8;
  TORCH_ARG(int64_t, in_channels) = 3;
  TORCH_ARG(int64_t, d_model) = 128;
  TORCH_ARG(int64_t, depth) = 4;
  TORCH_ARG(int64_t, num_heads) = 4;
  TORCH_ARG(double, mlp_ratio) = 4.0;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(PosEmbedding, pos_embedding) = PosEmbedding::learned;
  /// `cls`: a CLS token; `mean`: no CLS, the mean of the patch tokens; `map`:
  /// no CLS, SigLIP's multihead attention pooling head (a learned probe
  /// attends over the tokens, then LayerNorm + MLP with a residual).
  TORCH_ARG(ImagePool, pool) = ImagePool::cls;
  /// Norm and MLP of the blocks (and the final norm), as in the decoder.
  TORCH_ARG(NormType, norm) = NormType::layernorm;
  TORCH_ARG(MlpType, mlp) = MlpType::gelu;
  /// Activation checkpointing of the blocks while training (less memory, one more forward).
  TORCH_ARG(bool, activation_checkpointing) = false;
  /// `patch`: one strided convolution (the ViT paper); `conv`: the conv stage
  /// (log2(patch_size) stride-2 convolutions, Xiao et al. 2021 "Early
  /// Convolutions Help Transformers See Better").
  TORCH_ARG(ViTStem, stem) = ViTStem::patch;
};

template <class V>
void visit_fields(ViTOptions& o, V& v) {
  v("image_size", o.image_size());
  v("patch_size", o.patch_size());
  v("in_channels", o.in_channels());
  v("d_model", o.d_model());
  v("depth", o.depth());
  v("num_heads", o.num_heads());
  v("mlp_ratio", o.mlp_ratio());
  v("dropout", o.dropout());
  v("pos_embedding", o.pos_embedding());
  v("pool", o.pool());
  v("stem", o.stem());
  v("norm", o.norm());
  v("mlp", o.mlp());
  v("activation_checkpointing", o.activation_checkpointing());
}

/// Options for the conv stage: a small CNN (stride-2 3x3 convolutions, each
/// followed by GroupNorm and GELU) whose feature map becomes tokens.
/// Used standalone as an image encoder or as the ViT stem.
struct ConvStageOptions {
  TORCH_ARG(int64_t, image_size) = 64;
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Output channels of each stride-2 stage; the image shrinks by 2^len.
  TORCH_ARG(std::vector<int64_t>, channels) = std::vector<int64_t>{32, 64, 128};
  /// Width of the output tokens (a linear map of the last feature map).
  TORCH_ARG(int64_t, d_model) = 128;
};

template <class V>
void visit_fields(ConvStageOptions& o, V& v) {
  v("image_size", o.image_size());
  v("in_channels", o.in_channels());
  v("channels", o.channels());
  v("d_model", o.d_model());
}

}  // namespace vlmkit
