#pragma once
/// The encoder slot contracts. Every image encoder maps images to tokens and a
/// pooled vector; every text encoder maps token ids (and a padding mask) to the
/// same structure. Fusion blocks, projectors and architectures rely only on
/// these contracts, so encoders are interchangeable.
#include <nlohmann/json_fwd.hpp>
#include <torch/nn/module.h>

#include "vlmkit/registry.h"

#include <array>

namespace vlmkit {

/// What an encoder returns.
struct EncoderOutput {
  /// [B, N, D] sequence of tokens (image patches in row-major grid order,
  /// without any CLS token; or text positions).
  torch::Tensor tokens;
  /// [B, D] one vector per sample.
  torch::Tensor pooled;
  /// [B, N] bool, true = padding; undefined when every token is valid.
  torch::Tensor padding_mask;
  /// (rows, cols) of the patch grid for image tokens; {0, 0} for text.
  std::array<int64_t, 2> grid{{0, 0}};
};

/// Base of the image encoders (ViT, ConvStage). Architectures built by name
/// hold this type; templates composed in C++ may hold the concrete type.
class ImageEncoderModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  /// images: [B, C, H, W] float.
  virtual EncoderOutput forward(const torch::Tensor& images) = 0;
  /// Variable-size images (dynamic resolution): each image sits in the top-left
  /// corner of the [B, C, H, W] batch, zero-padded on the right and bottom;
  /// image_sizes [B, 2] int64 holds each one's (height, width). Tokens of the
  /// padding are masked (EncoderOutput.padding_mask) and every valid token
  /// equals what the image alone gives. Undefined image_sizes: forward(images).
  /// Encoders that cannot do this exactly raise ValueError (the default).
  virtual EncoderOutput forward(const torch::Tensor& images, const torch::Tensor& image_sizes);
  /// Width D of tokens and pooled vector.
  virtual int64_t output_dim() const = 0;
  /// The config that rebuilds this encoder by name (includes "type").
  virtual nlohmann::json config() const = 0;
};

/// Base of the text encoders.
class TextEncoderModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  /// token_ids: [B, T] int64; padding_mask: [B, T] bool (true = padding) or
  /// undefined to derive it from the pad id.
  virtual EncoderOutput forward(const torch::Tensor& token_ids,
                                const torch::Tensor& padding_mask = {}) = 0;
  virtual int64_t output_dim() const = 0;
  virtual nlohmann::json config() const = 0;
};

/// The image-encoder and text-encoder slots: rows build an encoder from
/// (config, path) alone (registry.h; configs name them by "type").
using ImageEncoderRegistry = SlotRegistry<ImageEncoderModule>;
using TextEncoderRegistry = SlotRegistry<TextEncoderModule>;
ImageEncoderRegistry& image_encoder_registry();
TextEncoderRegistry& text_encoder_registry();

/// Registers an encoder class `Impl` (see slot_row) from its source file.
#define VLMKIT_REGISTER_IMAGE_ENCODER(Impl, python_class, doc) \
  VLMKIT_REGISTER(::vlmkit::image_encoder_registry(), (::vlmkit::slot_row<Impl, ::vlmkit::ImageEncoderModule>(python_class, doc)))
#define VLMKIT_REGISTER_TEXT_ENCODER(Impl, python_class, doc) \
  VLMKIT_REGISTER(::vlmkit::text_encoder_registry(), (::vlmkit::slot_row<Impl, ::vlmkit::TextEncoderModule>(python_class, doc)))

/// Base of the Two-Leg fusion blocks: two encoder outputs in, [B, dim] out.
class FusionModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  virtual torch::Tensor forward(const EncoderOutput& image, const EncoderOutput& text) = 0;
  virtual int64_t output_dim() const = 0;
  virtual nlohmann::json config() const = 0;
};

namespace detail {
/// Mean over the non-padding positions of tokens [B, N, D]; mask [B, N] bool
/// (true = padding) or undefined.
torch::Tensor masked_mean(const torch::Tensor& tokens, const torch::Tensor& padding_mask);
/// Checks image_sizes [B, 2] int64 against images [B, C, H, W] (each size in
/// [1, H] x [1, W] and a multiple of `multiple`) and returns it on the CPU.
torch::Tensor check_image_sizes(const torch::Tensor& image_sizes, const torch::Tensor& images, int64_t multiple,
                                const char* who);
/// The patch padding mask [B, (H/patch) * (W/patch)] bool (true = padding) of
/// checked sizes; undefined when no image is padded.
torch::Tensor patch_padding_mask(const torch::Tensor& sizes_cpu, int64_t height, int64_t width, int64_t patch,
                                 torch::Device device);
}  // namespace detail

}  // namespace vlmkit
