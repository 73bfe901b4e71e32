// JSON configs (the reader, make_* through the slot registries, build_model)
// and the explicit instantiations of the runtime-composed architectures
// (compiled once here, `extern` elsewhere).
#include <torch/torch.h>

#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/models/build.h"
#include "vlmkit/modules/conv_stage.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"

namespace vlmkit {

template class TwoTowerImpl<ImageEncoderModule, TextEncoderModule>;
template class EncoderDecoderImpl<ImageEncoderModule, ProjectorModule, DecoderFusionModule, TextDecoderImpl>;
template class EncoderTextDecoderImpl<ImageEncoderModule, TextEncoderImpl, ProjectorModule,
                                      DecoderFusionModule, TextDecoderImpl>;
template class TwoLegImpl<ImageEncoderModule, TextEncoderModule, FusionModule, HeadModule>;

// ---------------------------------------------------------------- JSON helpers
namespace detail {
std::string json_kind(const json& value) {
  switch (value.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean " + value.dump();
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "integer " + value.dump();
    case json::value_t::number_float: return "number " + value.dump();
    case json::value_t::string: return "string " + value.dump();
    case json::value_t::array: return "array";
    case json::value_t::object: return "object";
    default: return "value";
  }
}

std::string join_keys(const std::vector<std::string>& keys) { return join_names(keys); }
}  // namespace detail

ConfigReader::ConfigReader(const json& object, std::string path)
    : object_(object), path_(std::move(path)) {
  TORCH_CHECK_TYPE(object_.is_object(), "config", path_.empty() ? "" : " key '" + path_ + "'",
                   ": expected a JSON object, got ", detail::json_kind(object_));
}

void ConfigReader::finish() const {
  for (const auto& item : object_.items()) {
    if (std::find(known_.begin(), known_.end(), item.key()) != known_.end()) continue;
    auto allowed = known_;
    std::sort(allowed.begin(), allowed.end());
    TORCH_CHECK_VALUE(false, "unknown config key '", where(item.key()), "'; allowed keys",
                      path_.empty() ? "" : " of '" + path_ + "'", ": ",
                      detail::join_keys(allowed));
  }
}

void ConfigReader::read(const json& v, const std::string& at, int64_t& out) {
  TORCH_CHECK_TYPE(v.is_number_integer(), "config key '", at, "': expected an integer, got ",
                   detail::json_kind(v));
  out = v.get<int64_t>();
}

void ConfigReader::read(const json& v, const std::string& at, uint64_t& out) {
  TORCH_CHECK_TYPE(v.is_number_integer(), "config key '", at, "': expected an integer, got ", detail::json_kind(v));
  TORCH_CHECK_VALUE(v.is_number_unsigned() || v.get<int64_t>() >= 0, "config key '", at,
                    "': expected a non-negative integer, got ", v.dump());
  out = v.get<uint64_t>();
}

void ConfigReader::read(const json& v, const std::string& at, double& out) {
  TORCH_CHECK_TYPE(v.is_number(), "config key '", at, "': expected a number, got ",
                   detail::json_kind(v));
  out = v.get<double>();
}

void ConfigReader::read(const json& v, const std::string& at, bool& out) {
  TORCH_CHECK_TYPE(v.is_boolean(), "config key '", at, "': expected true or false, got ",
                   detail::json_kind(v));
  out = v.get<bool>();
}

void ConfigReader::read(const json& v, const std::string& at, std::string& out) {
  TORCH_CHECK_TYPE(v.is_string(), "config key '", at, "': expected a string, got ",
                   detail::json_kind(v));
  out = v.get<std::string>();
}

namespace {
/// A JSON list whose every item passes `is` (TypeError naming `what` otherwise).
template <class T>
std::vector<T> read_list(const json& v, const std::string& at, bool (json::*is)() const noexcept, const char* what) {
  TORCH_CHECK_TYPE(v.is_array(), "config key '", at, "': expected a list of ", what, ", got ", detail::json_kind(v));
  std::vector<T> values;
  for (const auto& item : v) {
    TORCH_CHECK_TYPE((item.*is)(), "config key '", at, "': expected a list of ", what, ", found ",
                     detail::json_kind(item));
    values.push_back(item.get<T>());
  }
  return values;
}
}  // namespace

void ConfigReader::read(const json& v, const std::string& at, std::vector<int64_t>& out) {
  out = read_list<int64_t>(v, at, &json::is_number_integer, "integers");
}

void ConfigReader::read(const json& v, const std::string& at, std::vector<std::string>& out) {
  out = read_list<std::string>(v, at, &json::is_string, "strings");
}

void ConfigReader::read(const json& v, const std::string& at, std::map<std::string, double>& out) {
  TORCH_CHECK_TYPE(v.is_object(), "config key '", at, "': expected a mapping of names to numbers, got ",
                   detail::json_kind(v));
  std::map<std::string, double> values;
  for (const auto& item : v.items()) {
    TORCH_CHECK_TYPE(item.value().is_number(), "config key '", at, ".", item.key(), "': expected a number, got ",
                     detail::json_kind(item.value()));
    values[item.key()] = item.value().get<double>();
  }
  out = std::move(values);
}

json parse_json(const std::string& text, const std::string& what) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {  // parse errors and number overflow (out_of_range 406)
    TORCH_CHECK_VALUE(false, what, " is not valid JSON: ", e.what());
  }
}

const json& sub_object(const json& object, const std::string& key, const std::string& path) {
  static const json null_value;
  if (!object.is_object()) return null_value;
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return null_value;
  const std::string at = path.empty() ? key : path + "." + key;
  TORCH_CHECK_TYPE(it->is_object(), "config key '", at, "': expected a JSON object, got ",
                   detail::json_kind(*it));
  return *it;
}

// ---------------------------------------------------------------- registry
namespace {
template <class E>
E type_of(const json& config, const std::string& path, E fallback) {
  if (!config.is_object()) return fallback;
  auto it = config.find("type");
  if (it == config.end() || it->is_null()) return fallback;
  return enum_from_json<E>(*it, path + ".type");
}

/// config["architecture"] ("two_tower" when absent), checked against the table.
std::string architecture_of(const json& config) {
  if (!config.is_object() || !config.contains("architecture")) return "two_tower";
  const auto& a = config["architecture"];
  TORCH_CHECK_TYPE(a.is_string(), "config key 'architecture': expected a string (one of ",
                   detail::join_names(architecture_table().names()), "), got ", detail::json_kind(a));
  return architecture_table().at(a.get<std::string>(), "architecture").name;
}

void check_architecture(const json& config, const std::string& expected) {
  if (!config.is_object() || !config.contains("architecture")) return;
  const auto got = architecture_of(config);
  TORCH_CHECK_VALUE(got == expected, "config says architecture '", got, "' but a '", expected,
                    "' model is being built");
}

/// The row of architecture `Impl` built by `make`.
template <class Impl>
ArchitectureRow architecture_row(const char* name, const char* python_class, const char* doc,
                                 std::shared_ptr<Impl> (*make)(const json&)) {
  return {name, python_class, doc,
          [make](const json& config) -> std::shared_ptr<torch::nn::Module> { return make(config); },
          [](const torch::nn::Module& model) -> json {
            const auto* m = dynamic_cast<const Impl*>(&model);
            return m ? m->config() : json();
          }};
}
}  // namespace

std::shared_ptr<ImageEncoderModule> make_image_encoder(const json& config, const std::string& path) {
  return image_encoder_registry().make(config, path, "vit");
}

std::shared_ptr<TextEncoderModule> make_text_encoder(const json& config, const std::string& path) {
  return text_encoder_registry().make(config, path, "transformer");
}

std::shared_ptr<FusionModule> make_fusion(const json& config, int64_t image_dim, int64_t text_dim,
                                          const std::string& path) {
  return fusion_registry().make(config, path, "concat_mlp", image_dim, text_dim);
}

std::shared_ptr<TwoTowerImpl<>> make_two_tower(const json& config) {
  check_architecture(config, "two_tower");
  TwoTowerOptions options;
  read_options(config, "", options, {"architecture", "image_encoder", "text_encoder"});
  auto image = make_image_encoder(sub_object(config, "image_encoder", ""));
  auto text = make_text_encoder(sub_object(config, "text_encoder", ""));
  return std::make_shared<TwoTowerImpl<>>(image, text, options);
}

std::shared_ptr<TwoLegImpl<>> make_two_leg(const json& config) {
  check_architecture(config, "two_leg");
  TwoLegOptions options;
  read_options(config, "", options, {"architecture", "image_encoder", "text_encoder", "fusion", "head"});
  auto image = make_image_encoder(sub_object(config, "image_encoder", ""));
  auto text = make_text_encoder(sub_object(config, "text_encoder", ""));
  auto fusion = make_fusion(sub_object(config, "fusion", ""), image->output_dim(), text->output_dim());
  auto head = head_registry().make(sub_object(config, "head", ""), "head", "classification", fusion->output_dim());
  return std::make_shared<TwoLegImpl<>>(image, text, fusion, head, options);
}

DecoderFusionType fusion_type(const json& config) {
  if (config.is_null()) return DecoderFusionType::concat;
  if (config.is_string()) return enum_from_json<DecoderFusionType>(config, "fusion");
  TORCH_CHECK_TYPE(config.is_object(), "config key 'fusion': expected a name (",
                   detail::join_names(enum_names<DecoderFusionType>()), ") or an object, got ",
                   detail::json_kind(config));
  ConfigReader reader(config, "fusion");
  reader.allow("type");
  reader.finish();
  return type_of(config, "fusion", DecoderFusionType::concat);
}

std::shared_ptr<TextDecoderImpl> make_decoder(const json& config, const DecoderFusionModule& fusion,
                                              const std::string& path) {
  TextDecoderOptions options;
  options.cross_attention_every(fusion.default_cross_attention_every());
  read_options(config, path, options);
  return std::make_shared<TextDecoderImpl>(options);
}


std::shared_ptr<EncoderDecoderImpl<>> make_encoder_decoder(const json& config) {
  check_architecture(config, "encoder_decoder");
  GenerativeOptions options;
  read_options(config, "", options, {"architecture", "image_encoder", "projector", "fusion", "decoder"});
  const auto fusion = fusion_type(config.is_object() && config.contains("fusion") ? config["fusion"] : json());
  options.fusion(fusion);
  auto fusion_block = make_decoder_fusion(fusion, options.image_token_id());
  auto image = make_image_encoder(sub_object(config, "image_encoder", ""));
  auto decoder = make_decoder(sub_object(config, "decoder", ""), *fusion_block);
  auto projector = make_projector(sub_object(config, "projector", ""), image->output_dim(),
                                  fusion_block->memory_width(decoder->options));
  return std::make_shared<EncoderDecoderImpl<>>(image, projector, fusion_block, decoder, options);
}

std::shared_ptr<EncoderTextDecoderImpl<>> make_encoder_text_decoder(const json& config) {
  check_architecture(config, "encoder_text_decoder");
  GenerativeOptions options;
  read_options(config, "", options,
               {"architecture", "image_encoder", "text_encoder", "projector", "fusion", "decoder"});
  const auto fusion = fusion_type(config.is_object() && config.contains("fusion") ? config["fusion"] : json());
  options.fusion(fusion);
  json image_config = sub_object(config, "image_encoder", "");
  if (image_config.is_null()) image_config = json{{"type", "conv"}};  // the conv stage by default
  auto image = make_image_encoder(image_config);
  auto text = std::dynamic_pointer_cast<TextEncoderImpl>(make_text_encoder(sub_object(config, "text_encoder", "")));
  auto fusion_block = make_decoder_fusion(fusion, options.image_token_id());
  auto decoder = make_decoder(sub_object(config, "decoder", ""), *fusion_block);
  auto projector = make_projector(sub_object(config, "projector", ""), text->output_dim(),
                                  fusion_block->memory_width(decoder->options));
  return std::make_shared<EncoderTextDecoderImpl<>>(image, text, projector, fusion_block, decoder, options);
}

std::shared_ptr<torch::nn::Module> build_model(const json& config) {
  TORCH_CHECK_TYPE(config.is_object() || config.is_null(),
                   "build_model: expected a config object, got ", detail::json_kind(config));
  return architecture_table().at(architecture_of(config)).make(config);
}

json model_config(const torch::nn::Module& model) {
  for (const auto& row : architecture_table().rows()) {
    auto config = row.config_of(model);
    if (!config.is_null()) return config;
  }
  TORCH_CHECK_VALUE(false, "model_config: ", model.name(), " is not a vlmkit architecture");
}

ArchitectureTable& architecture_table() {
  static ArchitectureTable table("architecture");
  return table;
}

VLMKIT_REGISTER(architecture_table(),
                architecture_row("two_tower", "TwoTower",
                                 "image and text towers under one contrastive objective (CLIP / SigLIP)",
                                 make_two_tower))
VLMKIT_REGISTER(architecture_table(),
                architecture_row("two_leg", "TwoLeg", "both encoders, a fusion block and a task head",
                                 make_two_leg))
VLMKIT_REGISTER(architecture_table(),
                architecture_row("encoder_text_decoder", "EncoderTextDecoder",
                                 "a conv stage and a text encoder encoded together, projected into a text decoder",
                                 make_encoder_text_decoder))
VLMKIT_REGISTER(architecture_table(),
                architecture_row("encoder_decoder", "EncoderDecoder",
                                 "image encoder, projector and a next-token text decoder (LLaVA / Flamingo)",
                                 make_encoder_decoder))

}  // namespace vlmkit
