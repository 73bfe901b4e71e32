// Checkpoint directories, module state, save_model / load_model (train/checkpoint.h).
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include "../internal.h"
#include "files.h"
#include "vlmkit/models/build.h"
#include "vlmkit/runtime.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/lora.h"
#include "vlmkit/train/trainer.h"

namespace fs = std::filesystem;

namespace vlmkit {
namespace {
std::atomic<int64_t> temp_counter{0};
}  // namespace

using detail::fsync_dir;
using detail::read_file;
using detail::write_synced;

// ------------------------------------------------------------------ checkpoint directories
CheckpointWriter::CheckpointWriter(std::string root, std::string name) : root_(std::move(root)), name_(std::move(name)) {
  TORCH_CHECK_VALUE(!name_.empty() && name_[0] != '.' && name_.find('/') == std::string::npos,
                    "checkpoint name must be a plain directory name, got '", name_, "'");
  fs::create_directories(root_);
  temp_ = (fs::path(root_) / (".tmp-" + name_ + "-" + std::to_string(::getpid()) + "-" +
                              std::to_string(temp_counter++)))
              .string();
  fs::remove_all(temp_);
  fs::create_directory(temp_);
}

CheckpointWriter::~CheckpointWriter() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(temp_, ec);
  }
}

void CheckpointWriter::add_bytes(const std::string& file, const std::string& bytes) {
  TORCH_CHECK(!committed_, "CheckpointWriter: already committed");
  write_synced((fs::path(temp_) / file).string(), bytes);
  sums_[file] = sha256_hex(bytes);
}

void CheckpointWriter::add_json(const std::string& file, const json& value) { add_bytes(file, value.dump(2) + "\n"); }

void CheckpointWriter::add_tensors(const std::string& file, const TensorMap& tensors, const StringMap& metadata) {
  add_bytes(file, serialize_safetensors(tensors, metadata));
}

std::string CheckpointWriter::commit(bool update_latest) {
  TORCH_CHECK(!committed_, "CheckpointWriter: already committed");
  std::string sums;
  for (const auto& [file, sum] : sums_) sums += sum + "  " + file + "\n";
  write_synced((fs::path(temp_) / "SHA256SUMS").string(), sums);
  fsync_dir(temp_);
  const auto final_path = fs::path(root_) / name_;
  if (fs::exists(final_path)) {
    // Replacing a checkpoint of the same name: move the old one aside first
    // (a rename cannot replace a non-empty directory).
    const auto old = fs::path(root_) / (".old-" + name_ + "-" + std::to_string(::getpid()));
    fs::remove_all(old);
    fs::rename(final_path, old);
    fs::rename(temp_, final_path);
    fs::remove_all(old);
  } else {
    fs::rename(temp_, final_path);
  }
  committed_ = true;
  fsync_dir(root_);
  if (!update_latest) return final_path.string();
  const auto pointer = (fs::path(root_) / ".latest.tmp").string();
  write_synced(pointer, name_ + "\n");
  fs::rename(pointer, fs::path(root_) / "latest");
  fsync_dir(root_);
  return final_path.string();
}

Checkpoint::Checkpoint(const std::string& path) {
  TORCH_CHECK_VALUE(!path.empty(), "checkpoint path is empty");
  if (fs::exists(fs::path(path) / "SHA256SUMS")) {
    path_ = path;
  } else {
    for (const auto& root : {fs::path(path), fs::path(path) / "checkpoints"}) {
      if (fs::is_directory(root) && !(path_ = latest_checkpoint(root.string())).empty()) break;
    }
    if (path_.empty())
      throw NotFound("no checkpoint at '" + path +
                     "': expected a checkpoint directory (with SHA256SUMS) or a folder holding `latest` "
                     "(directly or under checkpoints/)");
  }
  std::istringstream lines(read_file((fs::path(path_) / "SHA256SUMS").string()));
  std::string line;
  int64_t number = 0;
  while (std::getline(lines, line)) {
    ++number;
    if (line.empty()) continue;
    const auto space = line.find("  ");
    TORCH_CHECK_VALUE(space == 64 && line.size() > 66, path_, "/SHA256SUMS:", number,
                      ": expected '<64 hex digits>  <file>', got '", line.substr(0, 100), "'");
    const auto file = line.substr(66);
    TORCH_CHECK_VALUE(file.find('/') == std::string::npos && file != "." && file != "..", path_, "/SHA256SUMS:",
                      number, ": file names must be plain names, got '", file, "'");
    sums_[file] = line.substr(0, 64);
  }
}

bool Checkpoint::has(const std::string& file) const { return sums_.count(file) > 0; }

void Checkpoint::verify() const {
  for (const auto& entry : sums_) read(entry.first);
}

std::string Checkpoint::read(const std::string& file) const {
  auto it = sums_.find(file);
  if (it == sums_.end()) throw NotFound("checkpoint '" + path_ + "' has no " + file);
  auto bytes = read_file((fs::path(path_) / file).string());
  const auto actual = sha256_hex(bytes);
  TORCH_CHECK_VALUE(actual == it->second, "checkpoint '", path_, "': ", file, " has SHA-256 ", actual,
                    " but SHA256SUMS records ", it->second, " (the file is corrupt, truncated or was changed)");
  return bytes;
}

json Checkpoint::read_json(const std::string& file) const { return parse_json(read(file), path_ + "/" + file); }

TensorMap Checkpoint::read_tensors(const std::string& file, StringMap* metadata) const {
  auto [tensors, meta] = parse_safetensors(read(file), path_ + "/" + file);
  if (metadata) *metadata = std::move(meta);
  return std::move(tensors);
}

std::string latest_checkpoint(const std::string& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return "";
  std::ifstream pointer(fs::path(root) / "latest");
  std::string name;
  if (pointer && std::getline(pointer, name) && !name.empty() && name.find('/') == std::string::npos &&
      fs::exists(fs::path(root) / name / "SHA256SUMS"))
    return (fs::path(root) / name).string();
  // No usable pointer: the newest directory of model weights whose files all
  // verify (a side folder such as an adapter is not a checkpoint of the run).
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const auto n = entry.path().filename().string();
    if (entry.is_directory() && n[0] != '.' && fs::exists(entry.path() / "SHA256SUMS") &&
        fs::exists(entry.path() / "model.safetensors"))
      names.push_back(n);
  }
  std::sort(names.rbegin(), names.rend());
  for (const auto& n : names) {
    try {
      Checkpoint c((fs::path(root) / n).string());
      c.verify();
      return c.path();
    } catch (const std::exception&) {
      continue;
    }
  }
  return "";
}

void prune_checkpoints(const std::string& root, int64_t keep) {
  std::error_code ec;
  std::vector<std::string> steps;
  std::ifstream pointer(fs::path(root) / "latest");
  std::string latest;
  if (pointer) std::getline(pointer, latest);
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const auto n = entry.path().filename().string();
    if (!entry.is_directory()) continue;
    if (n.rfind(".tmp-", 0) == 0 || n.rfind(".old-", 0) == 0) {
      // Leftovers of a crashed writer (not this process's live ones).
      if (n.find("-" + std::to_string(::getpid()) + "-") == std::string::npos) fs::remove_all(entry.path(), ec);
    } else if (n.rfind("step-", 0) == 0) {
      steps.push_back(n);
    }
  }
  std::sort(steps.rbegin(), steps.rend());
  for (size_t i = size_t(std::max<int64_t>(keep, 1)); i < steps.size(); ++i)
    if (steps[i] != latest) fs::remove_all(fs::path(root) / steps[i], ec);
}

// ------------------------------------------------------------------ module state
TensorMap module_state(const torch::nn::Module& module) {
  TensorMap out;
  for (const auto& p : module.named_parameters(true)) out[p.key()] = p.value();
  for (const auto& b : module.named_buffers(true)) out[b.key()] = b.value();
  return out;
}

namespace detail {
std::string join_list(const std::vector<std::string>& items, size_t limit) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < limit; ++i) out += (i ? ", " : "") + items[i];
  if (items.size() > limit) out += ", ... (" + std::to_string(items.size()) + " in all)";
  return out;
}

std::string state_mismatch(const TensorMap& own, const TensorMap& given, const char* source) {
  std::vector<std::string> missing, unexpected, mismatched;
  for (const auto& [name, t] : own)
    if (!given.count(name)) missing.push_back(name);
  for (const auto& [name, t] : given) {
    auto it = own.find(name);
    if (it == own.end()) unexpected.push_back(name);
    else if (it->second.sizes() != t.sizes())
      mismatched.push_back(name + " (" + source + " " + shape_str(t) + ", model " + shape_str(it->second) + ")");
  }
  return (missing.empty() ? "" : "missing " + join_list(missing) + "; ") +
         (unexpected.empty() ? "" : "unexpected " + join_list(unexpected) + "; ") +
         (mismatched.empty() ? "" : "shape mismatch " + join_list(mismatched) + "; ");
}
}  // namespace detail

void load_module_state(torch::nn::Module& module, const TensorMap& state, const std::string& what) {
  auto own = module_state(module);
  const auto problems = detail::state_mismatch(own, state, "checkpoint");
  TORCH_CHECK_VALUE(problems.empty(), "cannot load ", what, " into ", module.name(), ": ", problems,
                    "was it written for another architecture or config?");
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : own) t.copy_(state.at(name));
}

namespace detail {
/// Whole-model weights of a model that may carry LoRA adapters: refused when
/// they are merged (the weights would be base + adapter, and loading them
/// would add the adapter twice); adapters also write adapter_config.json, so
/// load_model attaches the same adapters before loading.
void add_model_state(CheckpointWriter& writer, const torch::nn::Module& model) {
  TORCH_CHECK_VALUE(!lora_merged(model), "cannot save ", model.name(), ": its LoRA adapters are merged into the weights; "
                    "unmerge_lora first, or remove_lora (merge=true) to save plain weights");
  if (!lora_layers(model).empty()) writer.add_json("adapter_config.json", lora_config_json(model));
  writer.add_tensors("model.safetensors", module_state(model), {{"format", "pt"}});
}
}  // namespace detail

std::string save_model(const std::string& root, const torch::nn::Module& model, const std::string& name) {
  CheckpointWriter writer(root, name);
  writer.add_json("config.json", model_config(model));
  detail::add_model_state(writer, model);
  return writer.commit();
}

std::shared_ptr<torch::nn::Module> load_model(const std::string& path) {
  Checkpoint checkpoint(path);
  auto model = build_model(checkpoint.read_json("config.json"));
  if (checkpoint.has("adapter_config.json"))
    apply_lora(*model, lora_options_from_json(checkpoint.read_json("adapter_config.json")));
  load_module_state(*model, checkpoint.read_tensors("model.safetensors"), checkpoint.path());
  return model;
}

}  // namespace vlmkit
