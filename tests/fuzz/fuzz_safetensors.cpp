// libFuzzer: the safetensors reader (checkpoint weights) on arbitrary bytes.
#include <cstdint>
#include <string>

#include "vlmkit/train/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    vlmkit::parse_safetensors(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const c10::Error&) {
  }
  return 0;
}
