#pragma once
// The process-wide "auto" / "aten" setting of a hand-written kernel, behind each
// set_<name>_kernel / <name>_kernel pair (mlp, norm, decode, gemm).
#include <c10/util/Exception.h>

#include <atomic>
#include <string>

namespace vlmkit {
namespace kernels {

class KernelSwitch {
 public:
  // `setter` names the function in the error for a bad setting.
  explicit KernelSwitch(const char* setter) : setter_(setter) {}
  void set(const std::string& kernel) {
    TORCH_CHECK_VALUE(kernel == "auto" || kernel == "aten", setter_, ": expected \"auto\" or \"aten\", got \"",
                      kernel, "\"");
    aten_ = kernel == "aten";
  }
  std::string get() const { return aten_.load() ? "aten" : "auto"; }
  bool is_auto() const { return !aten_.load(); }

 private:
  const char* setter_;
  std::atomic<bool> aten_{false};
};

}  // namespace kernels
}  // namespace vlmkit
