// libFuzzer: the JSON-schema constrained decoder. The input is a schema,
// a NUL byte, then characters to feed; whatever is accepted must stay a
// prefix that the matcher can still complete, and a finished value parses.
#include <cstdint>
#include <string>

#include "vlmkit/generate/json_schema.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const auto split = input.find('\0');
  const std::string schema_text = input.substr(0, split);
  const std::string feed = split == std::string::npos ? "" : input.substr(split + 1);
  vlmkit::ordered_json schema;
  try {
    schema = vlmkit::ordered_json::parse(schema_text);
  } catch (const std::exception&) {
    return 0;
  }
  try {
    vlmkit::JsonSchemaMatcher matcher(schema);
    std::string accepted;
    for (char c : feed)
      if (matcher.feed(c)) accepted += c;
    if (matcher.min_completion() < 0) __builtin_trap();
    if (matcher.can_finish() && matcher.min_completion() == 0) {
      (void)vlmkit::ordered_json::parse(accepted);  // throws (a finding) if not JSON
    }
  } catch (const c10::Error&) {
    // unsupported schema features raise ValueError: fine
  }
  return 0;
}
