// libFuzzer: byte tokenizer encode/decode round trips and decoding of
// arbitrary ids, the prompt template, and box parsing of arbitrary text.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "vlmkit/data/datasets.h"
#include "vlmkit/data/tokenizer.h"
#include "vlmkit/generate/boxes.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  vlmkit::ByteTokenizer tokenizer;
  auto ids = tokenizer.encode(text, /*add_bos=*/false);
  // Any bytes round-trip ("<image>" encodes to the placeholder id and back).
  if (tokenizer.decode(ids, /*skip_special=*/false) != text) __builtin_trap();
  std::vector<int64_t> raw;
  for (size_t i = 0; i + 8 <= size; i += 8) {
    int64_t v;
    std::memcpy(&v, data + i, 8);
    raw.push_back(v);
  }
  try {
    tokenizer.decode(raw);
  } catch (const c10::Error&) {
  }
  try {
    vlmkit::encode_conversation({{"user", text}, {"assistant", text}}, tokenizer);
  } catch (const c10::Error&) {
  }
  try {
    vlmkit::parse_boxes(text, 640, 480);
  } catch (const c10::Error&) {
  }
  return 0;
}
