// libFuzzer: the safetensors reader (checkpoint weights) on arbitrary bytes.
// Property: a file that loads re-serialises to a file that loads to the same
// tensors (names, dtypes, shapes, bytes) and the same metadata.
#include <cstdint>
#include <cstring>
#include <string>

#include "vlmkit/train/checkpoint.h"

namespace {
bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const auto x = a.contiguous(), y = b.contiguous();
  const size_t n = size_t(x.numel()) * size_t(x.element_size());
  return n == 0 || std::memcmp(x.data_ptr(), y.data_ptr(), n) == 0;  // raw bytes: NaNs and odd bools compare too
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::pair<vlmkit::TensorMap, vlmkit::StringMap> first;
  try {
    first = vlmkit::parse_safetensors(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const c10::Error&) {
    return 0;  // a clear error: fine
  }
  // Loaded: from here on every failure is a finding.
  const auto bytes = vlmkit::serialize_safetensors(first.first, first.second);
  const auto second = vlmkit::parse_safetensors(bytes, "fuzz re-serialised");
  if (second.second != first.second || second.first.size() != first.first.size()) __builtin_trap();
  for (const auto& [name, tensor] : first.first) {
    const auto it = second.first.find(name);
    if (it == second.first.end() || !same_bytes(tensor, it->second)) __builtin_trap();
  }
  return 0;
}
