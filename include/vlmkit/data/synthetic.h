#pragma once
/// The synthetic multitask dataset: deterministic scenes of coloured shapes on
/// noisy backgrounds with an optional rendered word, each yielding the
/// tasks vlmkit serves (caption, VQA by kind, OCR, detection, JSON extraction,
/// image-text pairs). Sample i depends only on (seed, i).
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>

#include <string>
#include <vector>

#include "vlmkit/generate/boxes.h"
#include "vlmkit/generate/polygons.h"

namespace vlmkit {

struct SyntheticOptions {
  int64_t image_size = 64;
  int64_t min_shapes = 1;
  int64_t max_shapes = 3;
  /// Probability that a scene carries a rendered word (OCR task).
  double word_probability = 0.5;
  uint64_t seed = 0;
};

struct SceneObject {
  std::string colour;
  std::string shape;
  Box box;  // pixels
  /// The pixels of the object that show (CV_8U, 1 inside): what the renderer
  /// drew, anti-aliased edges counted where at least half covered, less any
  /// text drawn over it.
  cv::Mat mask;
  /// The mask's outline traced exactly (polygon_to_mask gives the mask back).
  Polygon polygon;
  std::string label() const { return colour + " " + shape; }
};

struct QuestionAnswer {
  std::string kind;  // "colour", "shape", "count", "spatial"
  std::string question;
  std::string answer;
};

struct SyntheticSample {
  cv::Mat image;  // RGB uint8, image_size x image_size
  std::vector<SceneObject> objects;
  std::string word;  // "" when the scene has no text
  std::string caption;
  std::vector<QuestionAnswer> questions;
  /// {"Object": [labels], "Bounding_box": [[x1, y1, x2, y2] on the 0..999 grid]}.
  nlohmann::ordered_json detection;
  /// {"Description", "Colour", "Shapes", "Text"} filled from the scene.
  nlohmann::ordered_json extraction;
  /// {"Object": [labels], "Polygon": [outlines of at most kSegmentVertices vertices, 0..999 grid]}.
  nlohmann::ordered_json segmentation;
  /// One object, chosen at random, to segment: "Segment the <label>." and its
  /// segmentation JSON (one object).
  QuestionAnswer segment;
};

class SyntheticDataset {
 public:
  /// The vertex bound of the outlines in the segmentation answers.
  static constexpr int64_t kSegmentVertices = 12;
  static const std::vector<std::string>& colours();
  static const std::vector<std::string>& shapes();
  static const std::vector<std::string>& words();
  /// RGB value each colour name is drawn with.
  static cv::Vec3b colour_rgb(const std::string& name);

  SyntheticDataset(int64_t size, SyntheticOptions options = {});
  int64_t size() const { return size_; }
  SyntheticSample get(int64_t index) const;
  /// Writes images/NNNNNN.png and manifest.jsonl (one JSON object per line with
  /// image, caption, questions, ocr, objects (label, box, exact polygon),
  /// detection, extraction, segmentation, segment).
  void write(const std::string& directory) const;
  /// The manifest line of a sample (image path relative to the manifest).
  nlohmann::ordered_json manifest_entry(const SyntheticSample& sample, const std::string& image_path) const;

  const SyntheticOptions& options() const { return options_; }

 private:
  int64_t size_;
  SyntheticOptions options_;
};

}  // namespace vlmkit
