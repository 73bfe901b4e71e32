#pragma once
/// Dataset formats and the prompt template. Records hold what a sample is
/// (image reference, texts, boxes); decoding happens in the loader.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "vlmkit/data/tokenizer.h"
#include "vlmkit/generate/boxes.h"
#include "vlmkit/generate/polygons.h"

#include "vlmkit/detail/enum_names.h"

namespace vlmkit {

/// One turn of a conversation: role "user" or "assistant".
struct Turn {
  std::string role;
  std::string text;
};

struct Record {
  /// Absolute image path or a data URL.
  std::string image;
  /// Conversation; single-turn formats become [user: prompt, assistant: answer].
  std::vector<Turn> turns;
  std::vector<Box> boxes;  // pixels
  std::vector<std::string> labels;
  /// Each object's outline (pixels, generate/polygons.h), one per box, or none.
  /// A COCO object in several parts keeps its largest part.
  std::vector<Polygon> polygons;
  /// 1-based line (JSONL) or entry index (JSON) in the source, for messages.
  int64_t source_line = 0;
  /// The answer depends on geometry or reads text (boxes, left/right, OCR):
  /// augmentation must not flip or crop it.
  bool fixed_geometry = false;
  /// The last (assistant) turn is the detection JSON made from boxes and
  /// labels (COCO instances): the loader rewrites it when a resize policy
  /// moves the boxes (letterbox).
  bool answer_from_boxes = false;
  /// The last turn is the segmentation JSON made from polygons and labels: the
  /// loader rewrites it when the resize policy moves the polygons (letterbox).
  bool answer_from_polygons = false;
};

/// The detection answer {"Object": labels, "Bounding_box": boxes on the
/// 0..999 grid of a width x height image}.
std::string detection_answer(const std::vector<std::string>& labels, const std::vector<Box>& boxes, int64_t width,
                             int64_t height);

/// The segmentation answer of a record's objects, each outline simplified to
/// at most max_vertices (data/masks.h; OpenCV component).
std::string segmentation_answer_of(const std::vector<std::string>& labels, const std::vector<Polygon>& polygons,
                                   int64_t width, int64_t height, int64_t max_vertices = 12);

/// What to do with a malformed entry: raise ValueError naming file and line,
/// or skip it and count it in the report.
enum class BadSamplePolicy { raise, skip };
VLMKIT_ENUM_NAMES(BadSamplePolicy, "bad_samples policy", {BadSamplePolicy::raise, "raise"},
                  {BadSamplePolicy::skip, "skip"});

struct ReadReport {
  int64_t read = 0;
  int64_t skipped = 0;
  std::vector<std::string> problems;  // one line per skipped entry
};

/// JSONL manifest: one object per line with "image" (path relative to the
/// manifest, absolute, or a data URL) and either "conversations" (LLaVA
/// style), or "question"/"answer", or "text"/"caption"; optional "boxes"
/// ([[x1, y1, x2, y2]] pixels) with "labels", optional "polygons" ([[x1, y1,
/// x2, y2, x3, y3, ...]] pixels, one per object; the boxes default to their
/// bounding rectangles). Blank lines are ignored. Relative image paths are
/// resolved against image_root (empty: the manifest's folder); paths that
/// escape it are malformed.
std::vector<Record> read_jsonl_manifest(const std::string& path, BadSamplePolicy policy = BadSamplePolicy::raise,
                                        ReadReport* report = nullptr, const std::string& image_root = "");
/// LLaVA conversation JSON: [{"image": ..., "conversations": [{"from": "human"|"gpt", "value": ...}]}].
std::vector<Record> read_llava_json(const std::string& path, const std::string& image_root,
                                    BadSamplePolicy policy = BadSamplePolicy::raise, ReadReport* report = nullptr);
/// COCO captions: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}; one
/// record per caption.
std::vector<Record> read_coco_captions(const std::string& path, const std::string& image_root,
                                       BadSamplePolicy policy = BadSamplePolicy::raise, ReadReport* report = nullptr);
/// What a COCO instances record asks for.
enum class CocoTask { detect, segment };
/// COCO instances: boxes ([x, y, w, h] -> [x1, y1, x2, y2]), category names and segmentations
/// (polygons, or RLE masks traced to polygons) per image. Task detect: "Detect the objects." and the
/// detection JSON ({"Object": [...], "Bounding_box": [...]}, 0..999 grid); task segment: "Segment the
/// objects." and the segmentation JSON ({"Object": [...], "Polygon": [...]}), where every annotation
/// needs a segmentation. An object in several parts keeps its largest.
std::vector<Record> read_coco_instances(const std::string& path, const std::string& image_root,
                                        BadSamplePolicy policy = BadSamplePolicy::raise, ReadReport* report = nullptr,
                                        CocoTask task = CocoTask::detect);

/// The JSONL manifest line of a record ("image", "conversations", "boxes",
/// "labels", "polygons", "fixed_geometry", "answer_from_boxes",
/// "answer_from_polygons"): read back by
/// read_jsonl_manifest from a manifest in a folder that holds the image, it
/// gives the same record (tested, and a property of the datasets fuzzer).
nlohmann::ordered_json record_to_json(const Record& record);
/// Writes records as a JSONL manifest (one record_to_json line each).
void write_jsonl_manifest(const std::string& path, const std::vector<Record>& records);

/// Prompt template (LLaVA-style turns):
///   <bos>User: {user}\nAssistant: {assistant}<eos>\nUser: ...
/// Labels hold the assistant tokens (and their <eos>) and kIgnoreIndex
/// elsewhere. A user turn's "<image>" becomes the placeholder token.
struct EncodedConversation {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> labels;
  std::vector<int64_t> image_positions;
};
EncodedConversation encode_conversation(const std::vector<Turn>& turns, const ByteTokenizer& tokenizer = {});
/// The prompt for generation: all turns, then "Assistant: " awaiting the answer.
std::vector<int64_t> encode_prompt(const std::vector<Turn>& turns, const ByteTokenizer& tokenizer = {});

}  // namespace vlmkit
