#pragma once
// Shared by the sources of src/train/ (internal): whole-file reads, fsynced
// writes, optimizer state keys, a model's tensors in a checkpoint.
#include <torch/types.h>

#include <sstream>
#include <string>
#include <type_traits>

namespace vlmkit {
class CheckpointWriter;
}

namespace torch::nn {
class Module;
}

namespace vlmkit::detail {
/// The model's tensors (model.safetensors) and, for LoRA models,
/// adapter_config.json; merged adapters raise ValueError.
void add_model_state(CheckpointWriter& writer, const torch::nn::Module& model);
/// The whole file; NotFound when it cannot be opened.
std::string read_file(const std::string& path);
/// Writes bytes and fsyncs the file, so a rename after this never exposes a
/// partly written file.
void write_synced(const std::string& path, const std::string& bytes);
void fsync_dir(const std::string& path);

/// The key of a parameter's optimizer state: LibTorch 1.x keys it by the
/// printed TensorImpl address, 2.x by the pointer itself.
template <class Map>
auto optimizer_key(const torch::Tensor& p) {
  using Key = typename std::decay_t<Map>::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream s;
    s << p.unsafeGetTensorImpl();
    return s.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}
}  // namespace vlmkit::detail
