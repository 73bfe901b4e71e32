// libFuzzer: the JSONL manifest, LLaVA and COCO readers (detection and
// segmentation, polygons and RLE) on arbitrary files,
// under both bad-sample policies. Property: every record that parses, written
// as a manifest line (record_to_json) and read back, is the same record.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "vlmkit/data/datasets.h"

namespace {
bool same(const vlmkit::Record& a, const vlmkit::Record& b) {
  if (a.image != b.image || a.labels != b.labels || a.fixed_geometry != b.fixed_geometry ||
      a.answer_from_boxes != b.answer_from_boxes || a.answer_from_polygons != b.answer_from_polygons ||
      a.turns.size() != b.turns.size() || a.boxes.size() != b.boxes.size() || a.polygons.size() != b.polygons.size())
    return false;
  for (size_t i = 0; i < a.polygons.size(); ++i) {
    if (a.polygons[i].size() != b.polygons[i].size()) return false;
    for (size_t v = 0; v < a.polygons[i].size(); ++v)
      if (a.polygons[i][v].x != b.polygons[i][v].x || a.polygons[i][v].y != b.polygons[i][v].y) return false;
  }
  for (size_t i = 0; i < a.turns.size(); ++i)
    if (a.turns[i].role != b.turns[i].role || a.turns[i].text != b.turns[i].text) return false;
  for (size_t i = 0; i < a.boxes.size(); ++i)
    if (a.boxes[i].x1 != b.boxes[i].x1 || a.boxes[i].y1 != b.boxes[i].y1 || a.boxes[i].x2 != b.boxes[i].x2 ||
        a.boxes[i].y2 != b.boxes[i].y2)
      return false;
  return true;
}

void check_round_trip(const std::vector<vlmkit::Record>& records, const std::string& dir) {
  if (records.empty()) return;
  const std::string path = dir + "/round_trip.jsonl";
  vlmkit::write_jsonl_manifest(path, records);
  const auto again = vlmkit::read_jsonl_manifest(path);  // raise: every line must read
  if (again.size() != records.size()) __builtin_trap();
  for (size_t i = 0; i < records.size(); ++i)
    if (!same(records[i], again[i])) __builtin_trap();
}
}  // namespace

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
  using Reader = std::function<std::vector<vlmkit::Record>(vlmkit::BadSamplePolicy)>;
  const Reader readers[] = {
      [&](vlmkit::BadSamplePolicy p) { return vlmkit::read_jsonl_manifest(path, p); },
      [&](vlmkit::BadSamplePolicy p) { return vlmkit::read_llava_json(path, dir, p); },
      [&](vlmkit::BadSamplePolicy p) { return vlmkit::read_coco_captions(path, dir, p); },
      [&](vlmkit::BadSamplePolicy p) { return vlmkit::read_coco_instances(path, dir, p); },
      [&](vlmkit::BadSamplePolicy p) {
        return vlmkit::read_coco_instances(path, dir, p, nullptr, vlmkit::CocoTask::segment);
      },
  };
  for (auto policy : {vlmkit::BadSamplePolicy::raise, vlmkit::BadSamplePolicy::skip})
    for (const auto& read : readers) {
      // Reading may fail with a clear error; the round trip of what was read may not.
      std::vector<vlmkit::Record> records;
      try {
        records = read(policy);
      } catch (const c10::Error&) {
      }
      check_round_trip(records, dir);
    }
  return 0;
}
