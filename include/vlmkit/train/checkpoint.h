#pragma once
/// Checkpoints and weight files.
///
/// Weights are safetensors files (the Hugging Face format: a JSON header and
/// raw little-endian tensor bytes), so loading never executes code from the
/// file. A checkpoint is a directory
///
///   step-00000600/config.json          model config (build_model reads it)
///                 model.safetensors    parameters and buffers by dotted name
///                 optimizer.safetensors  AdamW moments and step per parameter,
///                                      the RNG state
///                 trainer.json         step, data position, options, metrics
///                 SHA256SUMS           `sha256sum -c` format, verified on open
///
/// written into a temporary sibling directory, each file fsynced, then
/// renamed into place; `latest` (a one-line file, itself replaced by rename)
/// names the newest complete checkpoint. A crash at any moment leaves the
/// previous checkpoint intact and `latest` pointing at a complete one.
#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <utility>

#include "vlmkit/config.h"

namespace vlmkit {

using TensorMap = std::map<std::string, torch::Tensor>;
using StringMap = std::map<std::string, std::string>;

/// The bytes of a safetensors file holding tensors (any device; copied to
/// CPU) and string metadata.
std::string serialize_safetensors(const TensorMap& tensors, const StringMap& metadata = {});
/// Writes (and fsyncs) such a file.
void save_safetensors(const std::string& path, const TensorMap& tensors, const StringMap& metadata = {});
/// Reads a file written by save_safetensors (or any safetensors file with
/// supported dtypes). Malformed files raise ValueError naming the problem.
std::pair<TensorMap, StringMap> load_safetensors(const std::string& path);
/// The same from bytes in memory; `what` names the source in errors.
std::pair<TensorMap, StringMap> parse_safetensors(const std::string& bytes, const std::string& what);

/// Lower-case hex SHA-256 (OpenSSL).
std::string sha256_hex(const std::string& bytes);

/// Builds one checkpoint directory; nothing is visible under `root` until
/// commit(). Destroying an uncommitted writer removes its temporary files.
class CheckpointWriter {
 public:
  CheckpointWriter(std::string root, std::string name);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  void add_json(const std::string& file, const json& value);
  void add_tensors(const std::string& file, const TensorMap& tensors, const StringMap& metadata = {});
  /// Writes SHA256SUMS, fsyncs, renames into root/name, updates root/latest
  /// (unless `update_latest` is false: a side folder such as an adapter);
  /// returns the final path.
  std::string commit(bool update_latest = true);

 private:
  void add_bytes(const std::string& file, const std::string& bytes);
  std::string root_, name_, temp_;
  std::map<std::string, std::string> sums_;
  bool committed_ = false;
};

/// A checkpoint directory whose files were verified against SHA256SUMS.
class Checkpoint {
 public:
  /// `path`: a checkpoint directory, or a folder holding `latest` (directly
  /// or under checkpoints/). Raises FileNotFoundError-style c10::Error
  /// (vlmkit::NotFound) when there is none, ValueError when a file's checksum
  /// or format is wrong.
  explicit Checkpoint(const std::string& path);
  const std::string& path() const { return path_; }
  bool has(const std::string& file) const;
  /// Reads every file and checks it against SHA256SUMS (ValueError if not).
  void verify() const;
  json read_json(const std::string& file) const;
  TensorMap read_tensors(const std::string& file, StringMap* metadata = nullptr) const;

 private:
  std::string read(const std::string& file) const;
  std::string path_;
  std::map<std::string, std::string> sums_;
};

/// Raised when a file or checkpoint does not exist (Python: FileNotFoundError).
class NotFound : public c10::Error {
 public:
  explicit NotFound(const std::string& message) : c10::Error(message, "") {}
};

/// The newest complete checkpoint directory under `root` (the `latest`
/// pointer, else the newest directory of model weights that verifies); "" if none.
std::string latest_checkpoint(const std::string& root);
/// Keeps the newest `keep` step-* checkpoints under root (and what `latest`
/// names); removes leftover temporary directories.
void prune_checkpoints(const std::string& root, int64_t keep);

/// Parameters and buffers by dotted name (CPU copies not taken: live tensors).
TensorMap module_state(const torch::nn::Module& module);
/// Copies `state` into the module's parameters and buffers; raises ValueError
/// listing missing or unexpected names and shape mismatches (`what` names
/// the source, for example the checkpoint path).
void load_module_state(torch::nn::Module& module, const TensorMap& state, const std::string& what);

/// config.json + model.safetensors (+ SHA256SUMS) as a checkpoint `name`
/// under `root`; the model must be a vlmkit architecture (model_config).
std::string save_model(const std::string& root, const torch::nn::Module& model, const std::string& name = "model");
/// Builds the architecture from a checkpoint's config.json and loads its weights.
std::shared_ptr<torch::nn::Module> load_model(const std::string& path);

}  // namespace vlmkit
