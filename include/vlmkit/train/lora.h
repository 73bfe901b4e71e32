#pragma once
/// LoRA fine-tuning of any vlmkit model (Hu et al. 2021, as PEFT does it):
///
///   auto model = vlmkit::load_model("runs/vlm");              // a trained base
///   auto names = vlmkit::apply_lora(*model, vlmkit::LoraOptions().rank(8));
///   vlmkit::Trainer trainer(model, options);                  // trains the adapters only
///   trainer.fit(loader);
///   vlmkit::save_adapter("runs/lora/adapter", *model);        // a few hundred KiB
///   ...
///   vlmkit::load_adapter(*base, "runs/lora/adapter");         // onto the same base
///   vlmkit::merge_lora(*base);                                // plain weights again
///
/// An adapter folder holds `adapter_model.safetensors` (tensors named as PEFT
/// saves them, `base_model.model.<path>.lora_A.weight`) and `adapter_config.json`
/// (`peft_type` "LORA", `r`, `lora_alpha`, `lora_dropout`, `target_modules`).
#include <torch/nn/module.h>

#include <string>
#include <vector>

#include "vlmkit/config.h"
#include "vlmkit/train/checkpoint.h"

namespace vlmkit {

struct LoraOptions {
  TORCH_ARG(int64_t, rank) = 8;
  /// The adapter's output is scaled by alpha / rank.
  TORCH_ARG(double, alpha) = 16.0;
  TORCH_ARG(double, dropout) = 0.0;
  /// Which Linear layers get an adapter, as PEFT's target_modules: an entry
  /// names a layer by its dotted path or by its last components ("q_proj",
  /// "self_attn.q_proj"); `*` matches any run of characters, so
  /// "decoder.*_proj" reaches every projection inside the decoder. The
  /// default: every attention projection of every component.
  TORCH_ARG(std::vector<std::string>, target_modules) = {"q_proj", "k_proj", "v_proj", "out_proj"};
  /// Freeze every parameter that is not an adapter's (the usual LoRA set-up).
  TORCH_ARG(bool, freeze_base) = true;
};

/// True when `pattern` (a target_modules entry) selects the layer at `path`.
bool lora_target_matches(const std::string& pattern, const std::string& path);

/// Attaches adapters to the selected Linear layers and, with freeze_base,
/// freezes every other parameter. Returns the adapted layers' paths. Throws
/// a ValueError naming the model's Linear layers when an entry selects none,
/// and when the model already has adapters.
std::vector<std::string> apply_lora(torch::nn::Module& model, const LoraOptions& options);

/// The adapted layers' paths (empty without adapters).
std::vector<std::string> lora_layers(const torch::nn::Module& model);
/// True when some adapter is merged into its weight (whole-model saves then
/// refuse: the weights are no longer the base's).
bool lora_merged(const torch::nn::Module& model);
/// The options the model's adapters were attached with; ValueError without adapters.
LoraOptions lora_options(const torch::nn::Module& model);
/// adapter_config.json's content for the model's adapters.
json lora_config_json(const torch::nn::Module& model);
LoraOptions lora_options_from_json(const json& config);

/// Folds every adapter into its weight / takes it out again.
void merge_lora(torch::nn::Module& model);
void unmerge_lora(torch::nn::Module& model);
/// Detaches every adapter, merging it first when `merge` (the result is the
/// base architecture again, loadable without any LoRA code); re-enables
/// gradients of the base parameters.
void remove_lora(torch::nn::Module& model, bool merge = true);

/// The adapters' tensors under PEFT's names (base_model.model.<path>.lora_A.weight).
TensorMap adapter_state(const torch::nn::Module& model);
/// Writes `dir`/{adapter_model.safetensors, adapter_config.json} atomically
/// (a checkpoint folder with SHA256SUMS); returns its path.
std::string save_adapter(const std::string& dir, const torch::nn::Module& model);
/// Attaches adapters as `dir`'s adapter_config.json says (unless the model
/// has the same ones already) and loads their tensors. Throws a ValueError
/// when the adapter does not fit the model (names or shapes).
void load_adapter(torch::nn::Module& model, const std::string& dir);

}  // namespace vlmkit
