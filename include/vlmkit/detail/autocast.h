#pragma once
/// Scoped autocast state (torch.autocast from C++), shared by the Trainer's
/// bf16 steps and activation checkpointing's recomputation.
#include <torch/types.h>

namespace vlmkit::detail {

/// Autocast's enabled flag and low-precision dtype, for CPU and CUDA.
struct AutocastState {
  bool cpu_enabled = false;
  torch::ScalarType cpu_dtype = torch::kBFloat16;
  bool cuda_enabled = false;
  torch::ScalarType cuda_dtype = torch::kHalf;
  /// The calling thread's state now.
  static AutocastState current();
};

/// Sets autocast for its lifetime and restores the previous state after (also
/// when an exception leaves the scope), with autocast's cast cache cleared when
/// the outermost scope ends, as torch.autocast does.
class Autocast {
 public:
  /// Enables `dtype` autocast on `device`'s kind (CPU or CUDA).
  Autocast(const torch::Device& device, torch::ScalarType dtype);
  /// Sets both kinds as in `state` (a recomputation replaying a forward's state).
  explicit Autocast(const AutocastState& state);
  ~Autocast();
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  AutocastState saved_;
};

}  // namespace vlmkit::detail
