#pragma once
/// Building blocks and architectures by name from a JSON config: the runtime
/// composition path that Python uses (C++ apps may compose templates instead).
#include "vlmkit/models/encoder_decoder.h"
#include "vlmkit/models/encoder_text_decoder.h"
#include "vlmkit/models/two_leg.h"
#include "vlmkit/models/two_tower.h"

namespace vlmkit {

/// config: {"type": "vit" | "conv", ...options}; null gives the default ViT.
std::shared_ptr<ImageEncoderModule> make_image_encoder(const json& config,
                                                       const std::string& path = "image_encoder");
/// config: {"type": "transformer", ...options}.
std::shared_ptr<TextEncoderModule> make_text_encoder(const json& config,
                                                     const std::string& path = "text_encoder");
/// config: {"type": "concat_mlp" | "attention" | "gated" | "cross_attention", ...}.
std::shared_ptr<FusionModule> make_fusion(const json& config, int64_t image_dim, int64_t text_dim,
                                          const std::string& path = "fusion");

/// config: decoder options; `fusion` decides the default of cross_attention_every.
std::shared_ptr<TextDecoderImpl> make_decoder(const json& config, const DecoderFusionModule& fusion,
                                              const std::string& path = "decoder");
/// config: "concat" | "cross_attention" (or {"type": ...}).
DecoderFusionType fusion_type(const json& config);

std::shared_ptr<TwoTowerImpl<>> make_two_tower(const json& config);
std::shared_ptr<TwoLegImpl<>> make_two_leg(const json& config);
std::shared_ptr<EncoderDecoderImpl<>> make_encoder_decoder(const json& config);
std::shared_ptr<EncoderTextDecoderImpl<>> make_encoder_text_decoder(const json& config);

/// The architecture slot (a config's "architecture"): each row builds a model
/// from its whole config and reads a built model's config back. Rows register
/// in src/models/build.cpp, beside their make_* functions.
struct ArchitectureRow {
  std::string name;
  /// The class vlmkit exposes in Python (vlmkit.<python_class>).
  std::string python_class;
  /// One line: what it is.
  std::string doc;
  std::function<std::shared_ptr<torch::nn::Module>(const json& config)> make;
  /// The complete config of `model` when it is this architecture, else null.
  std::function<json(const torch::nn::Module& model)> config_of;
};
using ArchitectureTable = NamedTable<ArchitectureRow>;
ArchitectureTable& architecture_table();

/// Builds any architecture; config["architecture"] defaults to "two_tower".
std::shared_ptr<torch::nn::Module> build_model(const json& config);

/// The complete config (every default filled in) of a built model.
json model_config(const torch::nn::Module& model);

}  // namespace vlmkit
