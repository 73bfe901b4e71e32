// LoRA: the adapter inside vlmkit::Linear, and attaching, merging, saving and
// loading adapters across a whole model.
#include "vlmkit/train/lora.h"

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "vlmkit/kernels/gemm.h"
#include "vlmkit/modules/linear.h"
#include "vlmkit/runtime.h"
#include "../internal.h"

namespace fs = std::filesystem;

namespace vlmkit {

// ------------------------------------------------------------------ the layer
torch::Tensor LinearImpl::forward(const torch::Tensor& input) {
  // at::linear, not torch::nn::functional::linear: LibTorch 1.13's C++ functional
  // is matmul then `out += bias`, outside the op autocast wraps, so under bf16
  // autocast it adds a float32 bias to a bfloat16 product in place (ATen's slow
  // type-promoting path: 20-30 ms for a [32, 64, 512] output on two cores, a third of a
  // training step; docs/benchmarks.md, "bf16: the bias add"). at::linear is cast as
  // one op (bias included) and fuses the bias into addmm for 2-D and 3-D inputs.
  // In float32 on CPU, kernels::linear runs the GEMMs through oneDNN (kernels/gemm.h).
  auto out = kernels::linear(input, weight, bias);
  if (!has_lora() || merged_) return out;
  auto x = dropout_ > 0 && is_training() ? torch::dropout(input, dropout_, true) : input;
  return out + lora_B->forward(lora_A->forward(x)) * lora_scaling();
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  torch::nn::LinearImpl::pretty_print(stream);
  if (has_lora())
    stream << " + LoRA(rank=" << lora_rank() << ", alpha=" << alpha_ << ", dropout=" << dropout_
           << (merged_ ? ", merged" : "") << ")";
}

namespace {
void check_settings(int64_t rank, double alpha, double dropout) {
  TORCH_CHECK_VALUE(rank >= 1, "LoRA rank must be >= 1, got ", rank);
  TORCH_CHECK_VALUE(alpha > 0 && std::isfinite(alpha), "LoRA alpha must be a positive number, got ", alpha);
  TORCH_CHECK_VALUE(dropout >= 0 && dropout < 1, "LoRA dropout must be in [0, 1), got ", dropout);
}
}  // namespace

void LinearImpl::add_lora(int64_t rank, double alpha, double dropout) {
  TORCH_CHECK_VALUE(!has_lora(), "Linear.add_lora: this layer has an adapter already");
  check_settings(rank, alpha, dropout);
  const auto in = options.in_features(), out = options.out_features();
  auto a = torch::nn::Linear(torch::nn::LinearOptions(in, rank).bias(false));
  auto b = torch::nn::Linear(torch::nn::LinearOptions(rank, out).bias(false));
  {
    torch::NoGradGuard no_grad;
    // PEFT's initialisation: A as nn.Linear's default (Kaiming-uniform, a = sqrt(5)), B zero.
    torch::nn::init::kaiming_uniform_(a->weight, std::sqrt(5.0));
    b->weight.zero_();
  }
  a->to(weight.device(), weight.scalar_type());
  b->to(weight.device(), weight.scalar_type());
  lora_A = register_module("lora_A", a);
  lora_B = register_module("lora_B", b);
  alpha_ = alpha;
  dropout_ = dropout;
  merged_ = false;
}

namespace {
torch::Tensor lora_delta(const LinearImpl& layer) {
  return torch::matmul(layer.lora_B->weight, layer.lora_A->weight) * layer.lora_scaling();
}
}  // namespace

void LinearImpl::merge() {
  TORCH_CHECK_VALUE(has_lora(), "Linear.merge: no adapter attached");
  if (merged_) return;
  torch::NoGradGuard no_grad;
  weight.add_(lora_delta(*this));
  merged_ = true;
}

void LinearImpl::unmerge() {
  TORCH_CHECK_VALUE(has_lora(), "Linear.unmerge: no adapter attached");
  if (!merged_) return;
  torch::NoGradGuard no_grad;
  weight.sub_(lora_delta(*this));
  merged_ = false;
}

void LinearImpl::remove_lora() {
  if (!has_lora()) return;
  unregister_module("lora_A");
  unregister_module("lora_B");
  lora_A = nullptr;
  lora_B = nullptr;
  merged_ = false;
}

std::shared_ptr<torch::nn::Module> LinearImpl::clone(const c10::optional<torch::Device>& device) const {
  auto copy = std::make_shared<LinearImpl>(options);
  if (has_lora()) copy->add_lora(lora_rank(), alpha_, dropout_);
  copy->merged_ = merged_;
  copy->train(is_training());
  torch::NoGradGuard no_grad;
  auto mine = named_parameters(true);
  for (auto& p : copy->named_parameters(true)) {
    auto source = mine[p.key()];
    p.value().set_data(device ? source.to(*device).clone() : source.clone());
    p.value().set_requires_grad(source.requires_grad());
  }
  return copy;
}

// ------------------------------------------------------------------ the model
namespace {
bool wildcard(const std::string& pattern, size_t pi, const std::string& text, size_t ti) {
  while (pi < pattern.size()) {
    if (pattern[pi] == '*') {
      for (size_t k = ti; k <= text.size(); ++k)
        if (wildcard(pattern, pi + 1, text, k)) return true;
      return false;
    }
    if (ti >= text.size() || pattern[pi] != text[ti]) return false;
    ++pi;
    ++ti;
  }
  return ti == text.size();
}

std::string join_names(const std::vector<std::string>& names, size_t limit = 12) {
  return detail::join_list(names, limit);
}

/// (path, layer) for every vlmkit::Linear of the model, in module order (the
/// adapters' own lora_A / lora_B are plain torch::nn::Linear, so never listed).
std::vector<std::pair<std::string, LinearImpl*>> linear_layers(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, LinearImpl*>> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false))
    if (auto* layer = dynamic_cast<LinearImpl*>(item.value().get())) out.emplace_back(item.key(), layer);
  return out;
}

std::vector<std::pair<std::string, LinearImpl*>> adapted(const torch::nn::Module& model) {
  auto layers = linear_layers(model);
  layers.erase(std::remove_if(layers.begin(), layers.end(), [](const auto& l) { return !l.second->has_lora(); }),
               layers.end());
  return layers;
}

const std::string kPeftPrefix = "base_model.model.";
}  // namespace

bool lora_target_matches(const std::string& pattern, const std::string& path) {
  if (pattern.empty()) return false;
  if (wildcard(pattern, 0, path, 0)) return true;
  for (size_t i = 0; i < path.size(); ++i)  // or a dotted suffix of the path
    if (path[i] == '.' && wildcard(pattern, 0, path, i + 1)) return true;
  return false;
}

std::vector<std::string> apply_lora(torch::nn::Module& model, const LoraOptions& options) {
  TORCH_CHECK_VALUE(!options.target_modules().empty(), "apply_lora: target_modules is empty");
  TORCH_CHECK_VALUE(adapted(model).empty(), "apply_lora: the model has LoRA adapters already (",
                    join_names(lora_layers(model)), "); remove_lora first");
  const auto layers = linear_layers(model);
  std::vector<std::string> all;
  for (const auto& l : layers) all.push_back(l.first);
  std::set<std::string> chosen;
  for (const auto& pattern : options.target_modules()) {
    bool any = false;
    for (const auto& [path, layer] : layers)
      if (lora_target_matches(pattern, path)) {
        chosen.insert(path);
        any = true;
      }
    TORCH_CHECK_VALUE(any, "apply_lora: target '", pattern, "' selects no Linear layer of ", model.name(),
                      "; its Linear layers are ", join_names(all, 24));
  }
  check_settings(options.rank(), options.alpha(), options.dropout());  // before changing anything
  if (options.freeze_base())
    for (auto& p : model.parameters(true)) p.set_requires_grad(false);
  std::vector<std::string> out;
  for (const auto& [path, layer] : layers)
    if (chosen.count(path)) {
      layer->add_lora(options.rank(), options.alpha(), options.dropout());
      layer->train(model.is_training());
      out.push_back(path);
    }
  return out;
}

std::vector<std::string> lora_layers(const torch::nn::Module& model) {
  std::vector<std::string> out;
  for (const auto& l : adapted(model)) out.push_back(l.first);
  return out;
}

bool lora_merged(const torch::nn::Module& model) {
  for (const auto& l : adapted(model))
    if (l.second->merged()) return true;
  return false;
}

LoraOptions lora_options(const torch::nn::Module& model) {
  auto layers = adapted(model);
  TORCH_CHECK_VALUE(!layers.empty(), "the model has no LoRA adapters (vlmkit.lora.apply attaches them)");
  const auto* first = layers.front().second;
  std::vector<std::string> targets;
  for (const auto& [path, layer] : layers) {
    TORCH_CHECK_VALUE(layer->lora_rank() == first->lora_rank() && layer->lora_alpha() == first->lora_alpha() &&
                          layer->lora_dropout() == first->lora_dropout(),
                      "the model's adapters differ in rank, alpha or dropout (", layers.front().first, " and ", path,
                      "); an adapter config describes one setting");
    targets.push_back(path);
  }
  return LoraOptions()
      .rank(first->lora_rank())
      .alpha(first->lora_alpha())
      .dropout(first->lora_dropout())
      .target_modules(targets);
}

json lora_config_json(const torch::nn::Module& model) {
  const auto o = lora_options(model);
  return {{"peft_type", "LORA"},
          {"task_type", "CAUSAL_LM"},
          {"r", o.rank()},
          {"lora_alpha", o.alpha()},
          {"lora_dropout", o.dropout()},
          {"target_modules", o.target_modules()},
          {"bias", "none"},
          {"fan_in_fan_out", false},
          {"inference_mode", false},
          {"library", std::string("vlmkit ") + version()}};
}

LoraOptions lora_options_from_json(const json& c) {
  TORCH_CHECK_VALUE(c.is_object(), "adapter_config.json: expected an object");
  TORCH_CHECK_VALUE(c.value("peft_type", std::string()) == "LORA",
                    "adapter_config.json: peft_type must be \"LORA\", got ", c.value("peft_type", json()).dump());
  TORCH_CHECK_VALUE(c.contains("r") && c["r"].is_number_integer(), "adapter_config.json: \"r\" must be an integer");
  TORCH_CHECK_VALUE(c.contains("target_modules") && c["target_modules"].is_array() && !c["target_modules"].empty(),
                    "adapter_config.json: \"target_modules\" must be a non-empty list of module names");
  const auto bias = c.value("bias", std::string("none"));
  TORCH_CHECK_VALUE(bias == "none", "adapter_config.json: bias \"", bias, "\" is not supported (only \"none\")");
  TORCH_CHECK_VALUE(!c.value("use_dora", false), "adapter_config.json: DoRA adapters are not supported");
  LoraOptions o;
  o.rank(c["r"].get<int64_t>());
  o.alpha(c.value("lora_alpha", double(o.rank())));
  o.dropout(c.value("lora_dropout", 0.0));
  o.target_modules(c["target_modules"].get<std::vector<std::string>>());
  return o;
}

void merge_lora(torch::nn::Module& model) {
  auto layers = adapted(model);
  TORCH_CHECK_VALUE(!layers.empty(), "merge_lora: the model has no LoRA adapters");
  for (auto& l : layers) l.second->merge();
}

void unmerge_lora(torch::nn::Module& model) {
  auto layers = adapted(model);
  TORCH_CHECK_VALUE(!layers.empty(), "unmerge_lora: the model has no LoRA adapters");
  for (auto& l : layers) l.second->unmerge();
}

void remove_lora(torch::nn::Module& model, bool merge) {
  auto layers = adapted(model);
  TORCH_CHECK_VALUE(!layers.empty(), "remove_lora: the model has no LoRA adapters");
  for (auto& l : layers) {
    if (merge) l.second->merge();
    else l.second->unmerge();
    l.second->remove_lora();
  }
  for (auto& p : model.parameters(true)) p.set_requires_grad(true);
}

TensorMap adapter_state(const torch::nn::Module& model) {
  TensorMap out;
  for (const auto& [path, layer] : adapted(model)) {
    out[kPeftPrefix + path + ".lora_A.weight"] = layer->lora_A->weight.detach();
    out[kPeftPrefix + path + ".lora_B.weight"] = layer->lora_B->weight.detach();
  }
  return out;
}

std::string save_adapter(const std::string& dir, const torch::nn::Module& model) {
  auto config = lora_config_json(model);
  fs::path where = fs::path(dir).lexically_normal();
  if (where.filename().empty()) where = where.parent_path();
  const auto root = where.parent_path().empty() ? fs::path(".") : where.parent_path();
  CheckpointWriter writer(root.string(), where.filename().string());
  writer.add_json("adapter_config.json", config);
  writer.add_tensors("adapter_model.safetensors", adapter_state(model), {{"format", "pt"}});
  return writer.commit(/*update_latest=*/false);
}

void load_adapter(torch::nn::Module& model, const std::string& dir) {
  Checkpoint checkpoint(dir);
  TORCH_CHECK_VALUE(checkpoint.has("adapter_config.json") && checkpoint.has("adapter_model.safetensors"),
                    "load_adapter: '", checkpoint.path(),
                    "' is not an adapter folder (needs adapter_config.json and adapter_model.safetensors)");
  const auto options = lora_options_from_json(checkpoint.read_json("adapter_config.json"));
  auto state = checkpoint.read_tensors("adapter_model.safetensors");
  auto layers = adapted(model);
  TORCH_CHECK_VALUE(!lora_merged(model), "load_adapter: the model's adapters are merged; unmerge_lora first");
  if (layers.empty()) {
    apply_lora(model, options);
  } else {
    const auto own = lora_options(model);
    auto have = lora_layers(model);
    auto want = options.target_modules();
    std::sort(have.begin(), have.end());
    std::sort(want.begin(), want.end());
    TORCH_CHECK_VALUE(own.rank() == options.rank() && have == want, "load_adapter: the model has other adapters (rank ",
                      own.rank(), " on ", join_names(have), ") than '", checkpoint.path(), "' (rank ", options.rank(),
                      " on ", join_names(want), "); remove_lora first");
  }
  auto own = adapter_state(model);
  const auto problems = detail::state_mismatch(own, state, "adapter");
  TORCH_CHECK_VALUE(problems.empty(), "load_adapter: '", checkpoint.path(), "' does not fit ", model.name(), ": ",
                    problems, "was it trained on another base model?");
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : own) t.copy_(state.at(name));
}

}  // namespace vlmkit
