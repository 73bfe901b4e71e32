// libFuzzer: the JSONL manifest, LLaVA and COCO readers on arbitrary files,
// under both bad-sample policies.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "vlmkit/data/datasets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    char tmpl[] = "/tmp/vlmkit_fuzz_datasets_XXXXXX";
    return std::string(mkdtemp(tmpl));
  }();
  const std::string path = dir + "/input.json";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  for (auto policy : {vlmkit::BadSamplePolicy::raise, vlmkit::BadSamplePolicy::skip}) {
    try {
      vlmkit::read_jsonl_manifest(path, policy);
    } catch (const c10::Error&) {
    }
    try {
      vlmkit::read_llava_json(path, dir, policy);
    } catch (const c10::Error&) {
    }
    try {
      vlmkit::read_coco_captions(path, dir, policy);
    } catch (const c10::Error&) {
    }
    try {
      vlmkit::read_coco_instances(path, dir, policy);
    } catch (const c10::Error&) {
    }
  }
  return 0;
}
