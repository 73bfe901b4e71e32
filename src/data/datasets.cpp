// Dataset readers, the prompt template and the threaded loader.
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "vlmkit/data/loader.h"
#include "vlmkit/data/masks.h"
#include "vlmkit/fusion/decoder_fusion.h"

namespace fs = std::filesystem;

namespace vlmkit {
namespace {
using ojson = nlohmann::ordered_json;

/// Collects problems under the skip policy, raises under the raise policy.
struct Problems {
  BadSamplePolicy policy;
  ReadReport* report;
  std::string file;
  void bad(int64_t line, const std::string& what) {
    const std::string message = file + ":" + std::to_string(line) + ": " + what;
    TORCH_CHECK_VALUE(policy == BadSamplePolicy::skip, message, " (use bad_samples='skip' to skip and count such entries)");
    if (report) {
      ++report->skipped;
      report->problems.push_back(message);
    }
  }
  void ok() {
    if (report) ++report->read;
  }
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileNotFoundError("dataset file not found or not readable: '" + path + "'");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// A parser message with the offending input quoted: bytes outside printable
/// ASCII become \xNN, so the message is valid UTF-8 (Python str) whatever the file held.
std::string printable(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else {
      const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

ojson parse_document(const std::string& path) {
  try {
    return ojson::parse(read_file(path));
  } catch (const ojson::exception& e) {  // parse errors and number overflow (out_of_range 406)
    TORCH_CHECK_VALUE(false, path, ": not valid JSON (text must be UTF-8): ", printable(e.what()));
  }
}

/// Resolves an image reference against root; refuses paths escaping it.
std::string resolve_image(const ojson& value, const fs::path& root) {
  TORCH_CHECK_VALUE(value.is_string(), "'image' must be a string (path or data URL), got ", value.dump());
  const auto image = value.get<std::string>();
  TORCH_CHECK_VALUE(!image.empty(), "'image' is empty");
  if (image.rfind("data:", 0) == 0) return image;
  const auto base = fs::weakly_canonical(root);
  const auto full = fs::weakly_canonical(fs::path(image).is_absolute() ? fs::path(image) : root / image);
  const auto rel = full.lexically_relative(base);
  TORCH_CHECK_VALUE(!rel.empty() && *rel.begin() != "..", "image path '", image, "' escapes the dataset folder '",
                    base.string(), "'");
  return full.string();
}

std::string text_field(const ojson& entry, const char* key) {
  const auto& v = entry.at(key);
  TORCH_CHECK_VALUE(v.is_string(), "'", key, "' must be a string, got ", v.dump());
  return v.get<std::string>();
}

std::vector<Turn> llava_turns(const ojson& conversations) {
  TORCH_CHECK_VALUE(conversations.is_array() && !conversations.empty(), "'conversations' must be a non-empty list");
  std::vector<Turn> turns;
  for (const auto& c : conversations) {
    TORCH_CHECK_VALUE(c.is_object() && c.contains("from") && c.contains("value") && c["value"].is_string(),
                      "each conversation turn needs 'from' and a string 'value', got ", c.dump());
    const auto from = c["from"].get<std::string>();
    TORCH_CHECK_VALUE(from == "human" || from == "gpt" || from == "user" || from == "assistant",
                      "turn 'from' must be 'human'/'user' or 'gpt'/'assistant', got '", from, "'");
    turns.push_back({from == "human" || from == "user" ? "user" : "assistant", c["value"].get<std::string>()});
  }
  TORCH_CHECK_VALUE(turns.front().role == "user" && turns.back().role == "assistant",
                    "a conversation starts with the user and ends with the assistant");
  return turns;
}

/// A text that speaks of left or right: flipping the image would make it wrong.
bool mentions_side(const std::vector<Turn>& turns) {
  for (const auto& t : turns)
    if (t.text.find("left") != std::string::npos || t.text.find("right") != std::string::npos) return true;
  return false;
}

std::vector<Box> read_boxes(const ojson& boxes, bool xywh) {
  TORCH_CHECK_VALUE(boxes.is_array(), "'boxes' must be a list of [x1, y1, x2, y2]");
  std::vector<Box> out;
  for (const auto& b : boxes) {
    TORCH_CHECK_VALUE(b.is_array() && b.size() == 4 && std::all_of(b.begin(), b.end(), [](const ojson& v) { return v.is_number(); }),
                      "a box must be 4 numbers, got ", b.dump());
    Box box{b[0].get<double>(), b[1].get<double>(), b[2].get<double>(), b[3].get<double>()};
    if (xywh) box.x2 += box.x1, box.y2 += box.y1;
    TORCH_CHECK_VALUE(box.x1 >= 0 && box.y1 >= 0 && box.x2 > box.x1 && box.y2 > box.y1,
                      "a box needs 0 <= x1 < x2 and 0 <= y1 < y2, got ", b.dump());
    out.push_back(box);
  }
  return out;
}

Polygon read_flat_polygon(const ojson& p, const char* who) {
  TORCH_CHECK_VALUE(p.is_array() && std::all_of(p.begin(), p.end(), [](const ojson& v) { return v.is_number(); }),
                    who, ": a polygon must be a list of numbers [x1, y1, x2, y2, x3, y3, ...], got ",
                    p.dump().substr(0, 200));
  return polygon_from_flat(p.get<std::vector<double>>(), who);
}

/// An "answer_from_boxes" / "answer_from_polygons" flag: false when absent; true
/// needs objects, one label each.
bool answer_flag(const ojson& entry, const char* key, size_t objects, size_t labels) {
  if (!entry.contains(key)) return false;
  TORCH_CHECK_VALUE(entry[key].is_boolean(), "'", key, "' must be true or false, got ", entry[key].dump());
  const bool on = entry[key].get<bool>();
  TORCH_CHECK_VALUE(!on || (objects > 0 && labels == objects), "'", key, "' needs ",
                    std::string(key) == "answer_from_boxes" ? "'boxes'" : "'polygons'", " with one label each");
  return on;
}

/// [[x1, y1, x2, y2, ...]] pixels: flat lists of an even count >= 6 of finite numbers.
std::vector<Polygon> read_polygons(const ojson& polygons) {
  TORCH_CHECK_VALUE(polygons.is_array(), "'polygons' must be a list of [x1, y1, x2, y2, x3, y3, ...]");
  std::vector<Polygon> out;
  for (const auto& p : polygons) out.push_back(read_flat_polygon(p, "'polygons'"));
  return out;
}

/// A COCO "segmentation": polygons (the largest part kept) or an RLE mask
/// ({"counts": [...] or "...", "size": [height, width]}) traced to a polygon.
Polygon coco_segmentation(const ojson& s) {
  if (s.is_array()) {
    TORCH_CHECK_VALUE(!s.empty(), "'segmentation' is an empty list of polygons");
    Polygon best;
    double area = -1;
    for (const auto& part : s) {
      auto polygon = read_flat_polygon(part, "'segmentation'");
      const double a = polygon_area(polygon);
      if (a > area) best = std::move(polygon), area = a;
    }
    return best;
  }
  TORCH_CHECK_VALUE(s.is_object() && s.contains("counts") && s.contains("size") && s["size"].is_array() &&
                        s["size"].size() == 2 && s["size"][0].is_number_integer() && s["size"][1].is_number_integer(),
                    "'segmentation' must be a list of polygons or an RLE {\"counts\", \"size\": [height, width]}, got ",
                    s.dump().substr(0, 200));
  const int64_t h = s["size"][0].get<int64_t>(), w = s["size"][1].get<int64_t>();
  cv::Mat mask;
  if (s["counts"].is_string()) {
    mask = decode_coco_rle(s["counts"].get<std::string>(), h, w);
  } else {
    TORCH_CHECK_VALUE(s["counts"].is_array(), "RLE 'counts' must be a string or a list of integers");
    std::vector<int64_t> counts;
    for (const auto& c : s["counts"]) {
      TORCH_CHECK_VALUE(c.is_number_integer(), "RLE 'counts' must hold integers, got ", c.dump());
      counts.push_back(c.get<int64_t>());
    }
    mask = decode_coco_rle(counts, h, w);
  }
  auto parts = mask_to_polygons(mask, /*max_vertices=*/1000);
  TORCH_CHECK_VALUE(!parts.empty(), "the RLE mask is empty");
  return parts.front();
}
}  // namespace

std::string segmentation_answer_of(const std::vector<std::string>& labels, const std::vector<Polygon>& polygons,
                                   int64_t width, int64_t height, int64_t max_vertices) {
  std::vector<Polygon> simple;
  for (const auto& p : polygons) simple.push_back(simplify_polygon(p, max_vertices));
  return segmentation_answer(labels, simple, width, height);
}

std::vector<Record> read_jsonl_manifest(const std::string& path, BadSamplePolicy policy, ReadReport* report,
                                        const std::string& image_root) {
  std::ifstream in(path);
  if (!in) throw FileNotFoundError("manifest not found or not readable: '" + path + "'");
  const fs::path root = !image_root.empty()                  ? fs::path(image_root)
                        : fs::path(path).parent_path().empty() ? fs::path(".")
                                                               : fs::path(path).parent_path();
  Problems problems{policy, report, path};
  std::vector<Record> out;
  std::string line;
  int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      ojson entry;
      try {
        entry = ojson::parse(line);
      } catch (const ojson::exception& e) {  // parse errors and number overflow (out_of_range 406)
        TORCH_CHECK_VALUE(false, "not valid JSON, or text not UTF-8 (", printable(e.what()), ")");
      }
      TORCH_CHECK_VALUE(entry.is_object(), "expected a JSON object, got ", entry.type_name());
      TORCH_CHECK_VALUE(entry.contains("image"), "missing 'image'");
      Record r;
      r.source_line = number;
      r.image = resolve_image(entry["image"], root);
      if (entry.contains("conversations")) {
        r.turns = llava_turns(entry["conversations"]);
      } else if (entry.contains("question") || entry.contains("answer")) {
        TORCH_CHECK_VALUE(entry.contains("question") && entry.contains("answer"), "'question' needs 'answer' and vice versa");
        r.turns = {{"user", text_field(entry, "question")}, {"assistant", text_field(entry, "answer")}};
      } else if (entry.contains("text") || entry.contains("caption")) {
        r.turns = {{"user", "Describe the image."},
                   {"assistant", text_field(entry, entry.contains("text") ? "text" : "caption")}};
      } else {
        TORCH_CHECK_VALUE(false, "needs 'conversations', 'question'+'answer', or 'text'/'caption'");
      }
      // Objects: boxes, outlines (whose bounding rectangles are the boxes when none are given), labels.
      if (entry.contains("boxes")) r.boxes = read_boxes(entry["boxes"], false);
      if (entry.contains("polygons")) {
        r.polygons = read_polygons(entry["polygons"]);
        if (!entry.contains("boxes"))
          for (const auto& p : r.polygons) r.boxes.push_back(polygon_bounds(p));
        TORCH_CHECK_VALUE(r.polygons.size() == r.boxes.size(), "'polygons' must hold one polygon per box, got ",
                          r.polygons.size(), " polygons and ", r.boxes.size(), " boxes");
      }
      if (entry.contains("labels") && (entry.contains("boxes") || entry.contains("polygons"))) {
        TORCH_CHECK_VALUE(entry["labels"].is_array() && entry["labels"].size() == r.boxes.size(),
                          "'labels' must be a list with one label per object (box or polygon)");
        for (const auto& l : entry["labels"]) r.labels.push_back(l.is_string() ? l.get<std::string>() : l.dump());
      }
      r.answer_from_boxes = answer_flag(entry, "answer_from_boxes", r.boxes.size(), r.labels.size());
      r.answer_from_polygons = answer_flag(entry, "answer_from_polygons", r.polygons.size(), r.labels.size());
      r.fixed_geometry = !r.boxes.empty() || (entry.contains("ocr") && entry["ocr"].is_string() &&
                                              !entry["ocr"].get<std::string>().empty()) ||
                         (entry.contains("fixed_geometry") && entry["fixed_geometry"].is_boolean() &&
                          entry["fixed_geometry"].get<bool>());
      r.fixed_geometry |= mentions_side(r.turns);
      out.push_back(std::move(r));
      problems.ok();
    } catch (const c10::Error& e) {  // ValueError, TypeError, ...
      problems.bad(number, e.what_without_backtrace());
    }
  }
  return out;
}

ojson record_to_json(const Record& record) {
  ojson turns = ojson::array();
  for (const auto& t : record.turns) turns.push_back({{"from", t.role == "user" ? "human" : "gpt"}, {"value", t.text}});
  ojson out = {{"image", record.image}, {"conversations", turns}};
  if (!record.boxes.empty()) {
    ojson boxes = ojson::array();
    for (const auto& b : record.boxes) boxes.push_back({b.x1, b.y1, b.x2, b.y2});
    out["boxes"] = boxes;
    if (!record.labels.empty()) out["labels"] = record.labels;
  }
  if (!record.polygons.empty()) {
    ojson polygons = ojson::array();
    for (const auto& p : record.polygons) polygons.push_back(polygon_to_flat(p));
    out["polygons"] = polygons;
  }
  out["fixed_geometry"] = record.fixed_geometry;
  if (record.answer_from_boxes) out["answer_from_boxes"] = true;
  if (record.answer_from_polygons) out["answer_from_polygons"] = true;
  return out;
}

void write_jsonl_manifest(const std::string& path, const std::vector<Record>& records) {
  std::string text;
  for (const auto& r : records) text += record_to_json(r).dump() + "\n";
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  TORCH_CHECK_VALUE(out && out.write(text.data(), std::streamsize(text.size())), "write_jsonl_manifest: cannot write '",
                    path, "'");
}

std::vector<Record> read_llava_json(const std::string& path, const std::string& image_root, BadSamplePolicy policy,
                                    ReadReport* report) {
  const auto doc = parse_document(path);
  TORCH_CHECK_VALUE(doc.is_array(), path, ": a LLaVA file is a JSON list of samples, got ", doc.type_name());
  Problems problems{policy, report, path};
  std::vector<Record> out;
  int64_t number = 0;
  for (const auto& entry : doc) {
    ++number;
    try {
      TORCH_CHECK_VALUE(entry.is_object() && entry.contains("image") && entry.contains("conversations"),
                        "each sample needs 'image' and 'conversations'");
      Record r;
      r.source_line = number;
      r.image = resolve_image(entry["image"], image_root);
      r.turns = llava_turns(entry["conversations"]);
      r.fixed_geometry = mentions_side(r.turns);
      out.push_back(std::move(r));
      problems.ok();
    } catch (const c10::Error& e) {
      problems.bad(number, e.what_without_backtrace());
    }
  }
  return out;
}

namespace {
std::map<int64_t, std::string> coco_images(const ojson& doc, const std::string& path) {
  TORCH_CHECK_VALUE(doc.is_object() && doc.contains("images") && doc["images"].is_array() &&
                        doc.contains("annotations") && doc["annotations"].is_array(),
                    path, ": a COCO file needs 'images' and 'annotations' lists");
  std::map<int64_t, std::string> files;
  for (const auto& image : doc["images"]) {
    TORCH_CHECK_VALUE(image.is_object() && image.contains("id") && image["id"].is_number_integer() &&
                          image.contains("file_name") && image["file_name"].is_string(),
                      path, ": each image needs an integer 'id' and a 'file_name', got ", image.dump());
    files[image["id"].get<int64_t>()] = image["file_name"].get<std::string>();
  }
  return files;
}
}  // namespace

std::vector<Record> read_coco_captions(const std::string& path, const std::string& image_root, BadSamplePolicy policy,
                                       ReadReport* report) {
  const auto doc = parse_document(path);
  const auto files = coco_images(doc, path);
  Problems problems{policy, report, path};
  std::vector<Record> out;
  int64_t number = 0;
  for (const auto& a : doc["annotations"]) {
    ++number;
    try {
      TORCH_CHECK_VALUE(a.is_object() && a.contains("image_id") && a["image_id"].is_number_integer() &&
                            a.contains("caption") && a["caption"].is_string(),
                        "an annotation needs an integer 'image_id' and a string 'caption'");
      auto it = files.find(a["image_id"].get<int64_t>());
      TORCH_CHECK_VALUE(it != files.end(), "image_id ", a["image_id"].get<int64_t>(), " is not in 'images'");
      Record r;
      r.source_line = number;
      r.image = resolve_image(it->second, image_root);
      r.turns = {{"user", "Describe the image."}, {"assistant", a["caption"].get<std::string>()}};
      r.fixed_geometry = mentions_side(r.turns);
      out.push_back(std::move(r));
      problems.ok();
    } catch (const c10::Error& e) {
      problems.bad(number, e.what_without_backtrace());
    }
  }
  return out;
}

std::vector<Record> read_coco_instances(const std::string& path, const std::string& image_root, BadSamplePolicy policy,
                                        ReadReport* report, CocoTask task) {
  const auto doc = parse_document(path);
  const auto files = coco_images(doc, path);
  std::map<int64_t, std::string> categories;
  if (doc.contains("categories") && doc["categories"].is_array())
    for (const auto& c : doc["categories"])
      if (c.is_object() && c.contains("id") && c["id"].is_number_integer() && c.contains("name") && c["name"].is_string())
        categories[c["id"].get<int64_t>()] = c["name"].get<std::string>();
  Problems problems{policy, report, path};
  std::map<int64_t, Record> by_image;
  std::map<int64_t, std::pair<int64_t, int64_t>> sizes;
  for (const auto& image : doc["images"])
    if (image.contains("width") || image.contains("height")) {
      TORCH_CHECK_VALUE(image.contains("width") && image["width"].is_number_integer() && image.contains("height") &&
                            image["height"].is_number_integer(),
                        path, ": an image's 'width' and 'height' must both be integers, got ", image.dump());
      sizes[image["id"].get<int64_t>()] = {image["width"].get<int64_t>(), image["height"].get<int64_t>()};
    }
  int64_t number = 0;
  for (const auto& a : doc["annotations"]) {
    ++number;
    try {
      TORCH_CHECK_VALUE(a.is_object() && a.contains("image_id") && a.contains("bbox") && a.contains("category_id"),
                        "an annotation needs 'image_id', 'bbox' and 'category_id'");
      const int64_t id = a["image_id"].get<int64_t>();
      auto file = files.find(id);
      TORCH_CHECK_VALUE(file != files.end(), "image_id ", id, " is not in 'images'");
      auto category = categories.find(a["category_id"].get<int64_t>());
      TORCH_CHECK_VALUE(category != categories.end(), "category_id ", a["category_id"].dump(), " is not in 'categories'");
      auto boxes = read_boxes(ojson::array({a["bbox"]}), /*xywh=*/true);
      auto size = sizes.find(id);
      if (size != sizes.end())
        TORCH_CHECK_VALUE(boxes[0].x2 <= size->second.first + 1 && boxes[0].y2 <= size->second.second + 1,
                          "box ", a["bbox"].dump(), " lies outside the ", size->second.first, "x", size->second.second,
                          " image");
      // Objects without an outline are kept for detection; segmentation needs them all.
      Polygon outline;  // empty: none
      if (a.contains("segmentation") && !(a["segmentation"].is_array() && a["segmentation"].empty())) {
        const auto& seg = a["segmentation"];
        if (seg.is_object() && size != sizes.end() && seg.contains("size"))
          TORCH_CHECK_VALUE(seg["size"] == ojson::array({size->second.second, size->second.first}), "RLE 'size' ",
                            seg["size"].dump(), " is not the image's [height, width] = [", size->second.second, ", ",
                            size->second.first, "]");
        outline = coco_segmentation(seg);
      }
      TORCH_CHECK_VALUE(task == CocoTask::detect || (!outline.empty() && size != sizes.end()),
                        "the segmentation task needs each annotation's 'segmentation' (polygons or RLE) and its ",
                        "image's 'width' and 'height'");
      auto& r = by_image[id];
      if (r.image.empty()) {
        r.image = resolve_image(file->second, image_root);
        r.source_line = number;
      }
      r.boxes.push_back(boxes[0]);
      r.labels.push_back(category->second);
      r.polygons.push_back(std::move(outline));
      problems.ok();
    } catch (const c10::Error& e) {
      problems.bad(number, e.what_without_backtrace());
    } catch (const ojson::exception& e) {
      problems.bad(number, e.what());
    }
  }
  std::vector<Record> out;
  for (auto& [id, r] : by_image) {
    const auto size = sizes.count(id) ? sizes[id] : std::pair<int64_t, int64_t>{0, 0};
    // Outlines stay only when every object of the image has one (they pair with the boxes).
    if (std::any_of(r.polygons.begin(), r.polygons.end(), [](const Polygon& p) { return p.empty(); }))
      r.polygons.clear();
    r.fixed_geometry = true;
    if (task == CocoTask::segment) {
      r.turns = {{"user", "Segment the objects."},
                 {"assistant", segmentation_answer_of(r.labels, r.polygons, size.first, size.second)}};
      r.answer_from_polygons = true;
    } else {
      r.turns = {{"user", "Detect the objects."}, {"assistant", detection_answer(r.labels, r.boxes, size.first, size.second)}};
      r.answer_from_boxes = size.first > 0;
    }
    out.push_back(std::move(r));
  }
  return out;
}

std::string detection_answer(const std::vector<std::string>& labels, const std::vector<Box>& boxes, int64_t width,
                             int64_t height) {
  ojson objects = ojson::array(), coords = ojson::array();
  for (size_t i = 0; i < boxes.size(); ++i) {
    objects.push_back(i < labels.size() ? labels[i] : std::string("object"));
    if (width > 0 && height > 0)
      coords.push_back({normalize_coordinate(boxes[i].x1, width), normalize_coordinate(boxes[i].y1, height),
                        normalize_coordinate(boxes[i].x2, width), normalize_coordinate(boxes[i].y2, height)});
  }
  return ojson{{"Object", objects}, {"Bounding_box", coords}}.dump();
}

// ---------------------------------------------------------------- prompt template
namespace {
void append(std::vector<int64_t>& ids, std::vector<int64_t>& labels, const std::vector<int64_t>& add, bool learn) {
  ids.insert(ids.end(), add.begin(), add.end());
  labels.insert(labels.end(), add.size(), kIgnoreIndex);
  if (learn) std::copy(add.begin(), add.end(), labels.end() - int64_t(add.size()));
}
}  // namespace

EncodedConversation encode_conversation(const std::vector<Turn>& turns, const ByteTokenizer& tokenizer) {
  TORCH_CHECK_VALUE(!turns.empty(), "encode_conversation: expected at least one turn");
  EncodedConversation out;
  append(out.input_ids, out.labels, {tokenizer.special().bos}, false);
  for (size_t i = 0; i < turns.size(); ++i) {
    const auto& t = turns[i];
    TORCH_CHECK_VALUE(t.role == "user" || t.role == "assistant", "encode_conversation: role must be 'user' or ",
                      "'assistant', got '", t.role, "'");
    if (t.role == "user") {
      append(out.input_ids, out.labels, tokenizer.encode((i ? "\nUser: " : "User: ") + t.text + "\nAssistant: ", false, false),
             false);
    } else {
      auto answer = tokenizer.encode(t.text, false, false);
      answer.push_back(tokenizer.special().eos);
      append(out.input_ids, out.labels, answer, true);
    }
  }
  for (size_t i = 0; i < out.input_ids.size(); ++i)
    if (out.input_ids[i] == tokenizer.special().image) out.image_positions.push_back(int64_t(i));
  return out;
}

std::vector<int64_t> encode_prompt(const std::vector<Turn>& turns, const ByteTokenizer& tokenizer) {
  TORCH_CHECK_VALUE(!turns.empty() && turns.back().role == "user", "encode_prompt: the last turn must be the user's");
  return encode_conversation(turns, tokenizer).input_ids;
}

// ---------------------------------------------------------------- loader
Loader::Loader(std::vector<Record> records, LoaderOptions options)
    : records_(std::move(records)), options_(std::move(options)), norm_(Normalization::preset(options_.normalize())) {
  TORCH_CHECK_VALUE(options_.batch_size() >= 1, "Loader: batch_size must be >= 1, got ", options_.batch_size());
  TORCH_CHECK_VALUE(options_.num_workers() >= 1 && options_.num_workers() <= 64,
                    "Loader: num_workers must be in [1, 64], got ", options_.num_workers());
  TORCH_CHECK_VALUE(options_.prefetch() >= 1, "Loader: prefetch must be >= 1, got ", options_.prefetch());
  const auto& mode = options_.resize();
  TORCH_CHECK_VALUE(mode == "square" || mode == "letterbox" || mode == "center_crop" || mode == "dynamic" ||
                        mode == "tiles",
                    "Loader: resize must be 'square', 'letterbox', 'center_crop', 'dynamic' or 'tiles', got '", mode,
                    "'");
  TORCH_CHECK_VALUE(mode != "tiles" || (options_.max_tiles() >= 1 && options_.crop_scale() == 1.0),
                    "Loader: resize 'tiles' needs max_tiles >= 1 and no random resized crops (crop_scale 1)");
  if (mode == "dynamic") {
    const int64_t factor = options_.patch_size() * options_.merge_size();
    TORCH_CHECK_VALUE(options_.patch_size() >= 1 && options_.merge_size() >= 1,
                      "Loader: patch_size and merge_size must be >= 1");
    if (options_.dynamic_min_pixels() == 0) options_.dynamic_min_pixels(factor * factor);
    if (options_.dynamic_max_pixels() == 0)
      options_.dynamic_max_pixels(std::max(options_.image_size() * options_.image_size(), factor * factor));
    TORCH_CHECK_VALUE(options_.dynamic_min_pixels() >= 1 && options_.dynamic_min_pixels() <= options_.dynamic_max_pixels(),
                      "Loader: need 1 <= dynamic_min_pixels <= dynamic_max_pixels, got ",
                      options_.dynamic_min_pixels(), " and ", options_.dynamic_max_pixels());
    TORCH_CHECK_VALUE(options_.crop_scale() == 1.0,
                      "Loader: crop_scale < 1 (random resized crops to a square) does not combine with resize "
                      "'dynamic'; use flips and colour jitter");
  }
  TORCH_CHECK_VALUE(options_.image_size() >= 1, "Loader: image_size must be >= 1");
  if (mode == "letterbox" || mode == "center_crop") {
    // Boxes move relative to the picture; only answers made from the boxes can follow.
    for (const auto& r : records_)
      TORCH_CHECK_VALUE(r.boxes.empty() || (mode == "letterbox" && (r.answer_from_boxes || r.answer_from_polygons)),
                        "Loader: the record at source line ",
                        r.source_line, " has boxes",
                        mode == "center_crop" ? " and resize 'center_crop' would cut them off"
                                              : " and an answer of its own that letterbox padding would shift",
                        "; use resize 'square' or 'dynamic' (normalised coordinates stay valid)",
                        mode == "letterbox" ? ", or COCO instances (their answers are rewritten for the letterbox)" : "");
  }
  for (const auto& r : records_)
    TORCH_CHECK_VALUE(r.polygons.empty() || r.polygons.size() == r.boxes.size(), "Loader: the record at source line ",
                      r.source_line, " has ", r.polygons.size(), " polygons for ", r.boxes.size(), " boxes");
  TORCH_CHECK_VALUE(options_.world_size() >= 1 && options_.rank() >= 0 && options_.rank() < options_.world_size(),
                    "Loader: need 0 <= rank < world_size, got rank ", options_.rank(), " of ", options_.world_size());
  TORCH_CHECK_VALUE(options_.flip_probability() >= 0 && options_.flip_probability() <= 1 &&
                        options_.crop_scale() > 0 && options_.crop_scale() <= 1 && options_.color_jitter() >= 0 &&
                        options_.color_jitter() < 1,
                    "Loader: need flip_probability in [0, 1], crop_scale in (0, 1], color_jitter in [0, 1)");
  TORCH_CHECK_VALUE(options_.pack_to() >= 0 && options_.pack_image_tokens() >= 1,
                    "Loader: need pack_to >= 0 (0 = no packing) and pack_image_tokens >= 1, got ", options_.pack_to(),
                    " and ", options_.pack_image_tokens());
  if (options_.group_by_length()) {
    lengths_.reserve(records_.size());
    for (const auto& r : records_) lengths_.push_back(int64_t(encode_conversation(r.turns, tokenizer_).input_ids.size()));
  }
}

Loader::~Loader() { stop(); }

int64_t Loader::num_batches() const {
  const int64_t w = options_.world_size(), b = options_.batch_size() * w;
  const int64_t n = w > 1 ? size() / b * b : size();  // ranks always see whole global batches
  return options_.drop_last() || w > 1 ? n / b : (n + b - 1) / b;
}

std::vector<int64_t> Loader::epoch_order(int64_t epoch) const {
  std::vector<int64_t> order(records_.size());
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(options_.seed() * 1000003ULL + uint64_t(epoch));
  if (options_.shuffle())
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[size_t(rng() % i)]);
  if (options_.group_by_length()) {
    // Windows of 32 (global) batches: sorted by length (longest first, ties by
    // position), cut into batches, the batches' order shuffled in the window.
    const size_t batch = size_t(options_.batch_size() * options_.world_size()), window = 32 * batch;
    for (size_t begin = 0; begin < order.size(); begin += window) {
      const size_t end = std::min(order.size(), begin + window);
      std::stable_sort(order.begin() + begin, order.begin() + end,
                       [&](int64_t a, int64_t b) { return lengths_[size_t(a)] > lengths_[size_t(b)]; });
      std::vector<std::vector<int64_t>> batches;
      for (size_t i = begin; i < end; i += batch)
        batches.emplace_back(order.begin() + i, order.begin() + std::min(end, i + batch));
      // A short last batch stays last (drop_last and sharding expect it there).
      const size_t full = batches.back().size() == batch ? batches.size() : batches.size() - 1;
      if (options_.shuffle())
        for (size_t i = full; i > 1; --i) std::swap(batches[i - 1], batches[size_t(rng() % i)]);
      size_t at = begin;
      for (const auto& part : batches)
        for (int64_t index : part) order[at++] = index;
    }
  }
  return order;
}

Loader::Prepared Loader::prepare(int64_t index, int64_t epoch) const {
  const auto& r = records_.at(size_t(index));
  const int64_t s = options_.image_size();
  const auto& mode = options_.resize();
  // Records with boxes decode at full size: their pixel boxes are checked against it.
  const int64_t min_side = r.boxes.empty() && options_.jpeg_draft() && mode != "dynamic" && mode != "tiles" ? s : 0;
  auto image = r.image.rfind("data:", 0) == 0 ? decode_data_url(r.image, options_.max_pixels(), min_side)
                                              : load_image(r.image, options_.max_pixels(), min_side);
  for (const auto& b : r.boxes) {
    // One pixel of slack for rounding in the annotation tool.
    TORCH_CHECK_VALUE(b.x1 >= -1 && b.y1 >= -1 && b.x2 <= image.cols + 1 && b.y2 <= image.rows + 1 && b.x1 < b.x2 &&
                          b.y1 < b.y2,
                      "box [", b.x1, ", ", b.y1, ", ", b.x2, ", ", b.y2,
                      "] is not a non-empty [x1, y1, x2, y2] inside the ", image.cols, "x", image.rows, " image");
  }
  for (const auto& polygon : r.polygons)
    for (const auto& p : polygon)
      TORCH_CHECK_VALUE(p.x >= -1 && p.y >= -1 && p.x <= image.cols + 1 && p.y <= image.rows + 1, "polygon vertex (",
                        p.x, ", ", p.y, ") lies outside the ", image.cols, "x", image.rows, " image");
  std::mt19937_64 rng(options_.seed() * 0x9E3779B97F4A7C15ULL ^ (uint64_t(epoch) << 32) ^ uint64_t(index));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const bool geometry = !r.fixed_geometry;
  auto turns = r.turns;
  std::vector<cv::Mat> views;
  if (mode == "tiles") {
    views = tile_image(image, s, options_.max_tiles(), options_.global_view());
  } else if (mode == "dynamic") {
    const auto size = dynamic_resolution(image.rows, image.cols, options_.patch_size(), options_.merge_size(),
                                         options_.dynamic_min_pixels(), options_.dynamic_max_pixels());
    if (size[0] != image.rows || size[1] != image.cols) image = resize_image(image, size[1], size[0]);
  } else if (geometry && options_.crop_scale() < 1.0) {
    image = random_resized_crop(image, s, rng, {options_.crop_scale(), 1.0});
  } else {
    if (mode == "letterbox") {
      LetterboxInfo info;
      image = letterbox(image, s, &info);
      if (r.answer_from_boxes) turns.back().text = detection_answer(r.labels, letterbox_boxes(r.boxes, info), s, s);
      if (r.answer_from_polygons)
        turns.back().text = segmentation_answer_of(r.labels, letterbox_polygons(r.polygons, info), s, s);
    } else {
      image = mode == "square" ? resize_square(image, s) : shortest_side_center_crop(image, s);
    }
  }
  if (views.empty()) views.push_back(image);
  // The same flip and jitter for every view of the record.
  const bool flip = geometry && options_.flip_probability() > 0 && u(rng) < options_.flip_probability();
  const std::mt19937_64 jitter_state = rng;
  for (auto& view : views) {
    if (flip) view = horizontal_flip(view);
    if (options_.color_jitter() > 0) {
      std::mt19937_64 jitter_rng = jitter_state;
      view = color_jitter(view, jitter_rng, options_.color_jitter(), options_.color_jitter(), options_.color_jitter());
    }
  }
  // One placeholder per view, where the record has its <image> (or in front of the first user turn).
  const std::string image_text = ByteTokenizer::kImageText;
  std::string placeholders;
  for (size_t i = 0; i < views.size(); ++i) placeholders += image_text;
  int64_t found = 0;
  for (auto& t : turns)
    for (size_t at = t.text.find(image_text); at != std::string::npos; at = t.text.find(image_text, at + placeholders.size())) {
      ++found;
      t.text.replace(at, image_text.size(), placeholders);
    }
  TORCH_CHECK_VALUE(found <= 1, "Loader: the record's conversation holds ", found,
                    " <image> placeholders; a record has one image");
  if (!found) turns.front().text = placeholders + turns.front().text;
  return {std::move(views), encode_conversation(turns, tokenizer_)};
}

std::vector<std::vector<size_t>> Loader::pack_rows(const std::vector<Prepared>& items) const {
  std::vector<std::vector<size_t>> rows;
  if (options_.pack_to() == 0) {
    for (size_t i = 0; i < items.size(); ++i) rows.push_back({i});
    return rows;
  }
  // First fit, longest first (ties in batch order): the decoder positions of
  // an example are its tokens plus pack_image_tokens - 1 per placeholder.
  std::vector<int64_t> cost(items.size());
  for (size_t i = 0; i < items.size(); ++i)
    cost[i] = int64_t(items[i].text.input_ids.size()) +
              int64_t(items[i].text.image_positions.size()) * (options_.pack_image_tokens() - 1);
  std::vector<size_t> by_length(items.size());
  std::iota(by_length.begin(), by_length.end(), size_t(0));
  std::stable_sort(by_length.begin(), by_length.end(), [&](size_t a, size_t b) { return cost[a] > cost[b]; });
  std::vector<int64_t> used;
  for (size_t i : by_length) {
    size_t row = 0;
    while (row < rows.size() && used[row] + cost[i] > options_.pack_to()) ++row;
    if (row == rows.size()) {
      rows.emplace_back();
      used.push_back(0);
    }
    rows[row].push_back(i);
    used[row] += cost[i];
  }
  return rows;
}

namespace {
/// A float32 CPU tensor of `sizes`, uninitialised. A batch of 32 images at 224 px
/// is 19 MB, fresh memory each batch, and touching it page by page was the
/// loader's largest cost after decoding (perf: ~20% of a worker's time in page
/// faults). Above a few MB the memory comes from mmap advised for transparent huge
/// pages, one fault per 2 MiB instead of per 4 KiB; elsewhere torch::empty.
torch::Tensor empty_images(at::IntArrayRef sizes) {
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(sizeof(float));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHuge = int64_t(2) << 20;
  if (bytes >= 2 * kHuge) {
    const size_t length = size_t((bytes + kHuge - 1) / kHuge * kHuge + kHuge);  // room to align
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      auto aligned = (reinterpret_cast<uintptr_t>(base) + uintptr_t(kHuge) - 1) & ~(uintptr_t(kHuge) - 1);
      madvise(reinterpret_cast<void*>(aligned), length - (aligned - reinterpret_cast<uintptr_t>(base)), MADV_HUGEPAGE);
      return torch::from_blob(reinterpret_cast<void*>(aligned), sizes,
                              [base, length](void*) { munmap(base, length); }, torch::kFloat);
    }
  }
#endif
  (void)bytes;
  return torch::empty(sizes, torch::kFloat);
}
}  // namespace

Batch Loader::collate(const std::vector<int64_t>& indices, std::vector<Prepared>& items) const {
  Batch batch;
  const auto rows = pack_rows(items);
  const bool packed = options_.pack_to() > 0;
  size_t longest = 0;
  int64_t height = 0, width = 0, count = 0;
  for (const auto& row : rows) {
    size_t tokens = 0;
    for (size_t i : row) tokens += items[i].text.input_ids.size();
    longest = std::max(longest, tokens);
  }
  for (auto& item : items) {
    for (const auto& image : item.images) {
      height = std::max<int64_t>(height, image.rows);
      width = std::max<int64_t>(width, image.cols);
      ++count;
    }
  }
  const int64_t b = int64_t(rows.size()), t = int64_t(longest);
  // Images are normalised straight into their batch slots (no per-image tensor
  // and no stacking copy); "dynamic" batches are zero-padded to the largest.
  const bool dynamic = options_.resize() == "dynamic";
  if (dynamic) {
    const int64_t factor = options_.patch_size() * options_.merge_size();
    height = (height + factor - 1) / factor * factor;
    width = (width + factor - 1) / factor * factor;
  }
  batch.images = empty_images({count, 3, height, width});
  if (dynamic) batch.images.zero_();
  batch.image_sizes = torch::empty({count, 2}, torch::kLong);
  batch.images_per_sample = torch::zeros({b}, torch::kLong);
  batch.input_ids = torch::full({b, t}, tokenizer_.special().pad, torch::kLong);
  batch.labels = torch::full({b, t}, kIgnoreIndex, torch::kLong);
  batch.padding_mask = torch::ones({b, t}, torch::kBool);
  if (packed) batch.segment_ids = torch::full({b, t}, -1, torch::kLong);
  auto sizes = batch.image_sizes.accessor<int64_t, 2>();
  auto per_row = batch.images_per_sample.accessor<int64_t, 1>();
  std::vector<int64_t> order;  // record indices in row order
  int64_t slot = 0;
  for (int64_t r = 0; r < b; ++r) {
    int64_t at = 0, segment = 0;
    for (size_t i : rows[size_t(r)]) {
      per_row[r] += int64_t(items[i].images.size());
      for (const cv::Mat& image : items[i].images) {
        TORCH_CHECK_VALUE(dynamic || (image.rows == height && image.cols == width),
                          "Loader: internal error: images of one batch differ in size");
        write_chw(image, norm_, batch.images[slot]);
        sizes[slot][0] = image.rows;
        sizes[slot][1] = image.cols;
        ++slot;
      }
      const auto& e = items[i].text;
      const int64_t n = int64_t(e.input_ids.size());
      batch.input_ids[r].slice(0, at, at + n).copy_(torch::tensor(e.input_ids, torch::kLong));
      batch.labels[r].slice(0, at, at + n).copy_(torch::tensor(e.labels, torch::kLong));
      batch.padding_mask[r].slice(0, at, at + n).fill_(false);
      if (packed) batch.segment_ids[r].slice(0, at, at + n).fill_(segment++);
      at += n;
      order.push_back(indices[i]);
    }
  }
  batch.indices = torch::tensor(order, torch::kLong);
  return batch;
}

void Loader::work() {
  while (true) {
    int64_t k;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || next_to_claim_ >= batches_ || next_to_claim_ < next_to_yield_ + options_.prefetch(); });
      if (stopping_ || next_to_claim_ >= batches_) return;
      k = next_to_claim_++;
    }
    const int64_t bs = options_.batch_size();
    const int64_t begin = k * bs, end = std::min<int64_t>(begin + bs, int64_t(order_.size()));
    std::vector<int64_t> indices;
    std::vector<Prepared> items;
    std::exception_ptr error;
    for (int64_t p = begin; p < end && !error; ++p) {
      const int64_t index = order_[size_t(p)];
      try {
        items.push_back(prepare(index, epoch_));
        indices.push_back(index);
      } catch (const std::exception& e) {
        if (options_.bad_samples() == BadSamplePolicy::skip) {
          ++skipped_;
        } else {
          const auto& r = records_[size_t(index)];
          try {
            TORCH_CHECK_VALUE(false, "Loader: record ", index, " (source line ", r.source_line, ", image '",
                              r.image.substr(0, 120), "'): ", e.what());
          } catch (...) {
            error = std::current_exception();
          }
        }
      }
    }
    std::optional<Batch> batch;
    if (!error && !items.empty()) {
      try {
        batch = collate(indices, items);
      } catch (...) {
        error = std::current_exception();
      }
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (error) errors_[k] = error;
      else ready_[k] = std::move(batch);
    }
    cv_.notify_all();
  }
}

void Loader::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
}

void Loader::start_epoch(int64_t epoch, int64_t first_batch) {
  stop();
  TORCH_CHECK_VALUE(epoch >= 0 && first_batch >= 0, "Loader.start_epoch: need epoch >= 0 and first_batch >= 0, got ",
                    epoch, " and ", first_batch);
  order_ = epoch_order(epoch);
  epoch_ = epoch;
  const int64_t b = options_.batch_size(), w = options_.world_size();
  if (w > 1) {
    // This rank's slice of every global batch.
    std::vector<int64_t> mine;
    for (int64_t k = 0; k < num_batches(); ++k)
      for (int64_t i = 0; i < b; ++i) mine.push_back(order_[size_t((k * w + options_.rank()) * b + i)]);
    order_ = std::move(mine);
  } else if (options_.drop_last()) {
    order_.resize(size_t(num_batches() * b));
  }
  batches_ = num_batches();
  next_to_claim_ = next_to_yield_ = std::min(first_batch, batches_);
  ready_.clear();
  errors_.clear();
  stopping_ = false;
  for (int64_t i = 0; i < options_.num_workers(); ++i) workers_.emplace_back([this] { work(); });
}

std::optional<Batch> Loader::next() {
  while (true) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (next_to_yield_ >= batches_) return std::nullopt;
    const int64_t k = next_to_yield_;
    cv_.wait(lock, [&] { return ready_.count(k) || errors_.count(k); });
    ++next_to_yield_;
    cv_.notify_all();
    if (errors_.count(k)) {
      auto error = errors_[k];
      errors_.erase(k);
      lock.unlock();
      std::rethrow_exception(error);
    }
    auto batch = std::move(ready_[k]);
    ready_.erase(k);
    if (batch) return batch;  // else every sample was skipped: go on
  }
}

}  // namespace vlmkit
