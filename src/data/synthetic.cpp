// The synthetic multitask dataset (see data/synthetic.h).
#include "vlmkit/data/synthetic.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <opencv2/imgproc.hpp>
#include <random>
#include <sstream>

#include "vlmkit/data/image.h"
#include "vlmkit/data/masks.h"

namespace vlmkit {
namespace {
bool overlaps(const Box& a, const Box& b, double margin) {
  return !(a.x2 + margin <= b.x1 || b.x2 + margin <= a.x1 || a.y2 + margin <= b.y1 || b.y2 + margin <= a.y1);
}

std::string join_objects(const std::vector<SceneObject>& objects) {
  std::string out;
  for (size_t i = 0; i < objects.size(); ++i) {
    if (i) out += i + 1 == objects.size() ? " and " : ", ";
    out += "a " + objects[i].label();
  }
  return out;
}
}  // namespace

const std::vector<std::string>& SyntheticDataset::colours() {
  static const std::vector<std::string> c{"red", "green", "blue", "yellow", "purple", "white"};
  return c;
}
const std::vector<std::string>& SyntheticDataset::shapes() {
  static const std::vector<std::string> s{"circle", "square", "triangle", "cross"};
  return s;
}
const std::vector<std::string>& SyntheticDataset::words() {
  static const std::vector<std::string> w{"cat", "dog", "sun", "map", "box", "red", "tea", "car", "pen", "key"};
  return w;
}

cv::Vec3b SyntheticDataset::colour_rgb(const std::string& name) {
  if (name == "red") return {220, 30, 30};
  if (name == "green") return {30, 180, 60};
  if (name == "blue") return {40, 70, 230};
  if (name == "yellow") return {235, 220, 30};
  if (name == "purple") return {150, 50, 200};
  if (name == "white") return {245, 245, 245};
  TORCH_CHECK_VALUE(false, "unknown colour '", name, "'");
}

SyntheticDataset::SyntheticDataset(int64_t size, SyntheticOptions options) : size_(size), options_(options) {
  TORCH_CHECK_VALUE(size >= 0, "SyntheticDataset: size must be >= 0, got ", size);
  TORCH_CHECK_VALUE(options_.image_size >= 32, "SyntheticDataset: image_size must be >= 32, got ", options_.image_size);
  TORCH_CHECK_VALUE(options_.min_shapes >= 1 && options_.min_shapes <= options_.max_shapes && options_.max_shapes <= 4,
                    "SyntheticDataset: need 1 <= min_shapes <= max_shapes <= 4, got ", options_.min_shapes, " and ",
                    options_.max_shapes);
}

SyntheticSample SyntheticDataset::get(int64_t index) const {
  TORCH_CHECK_INDEX(index >= 0 && index < size_, "SyntheticDataset: index ", index, " out of range [0, ", size_, ")");
  std::mt19937_64 rng(options_.seed * 0x9E3779B97F4A7C15ULL + uint64_t(index) + 1);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  auto pick = [&](size_t n) { return size_t(u(rng) * n) % n; };
  const int s = int(options_.image_size);
  SyntheticSample out;
  // Background: a dark or mid grey-ish tone with noise (never one of the shape colours).
  const int base = 40 + int(u(rng) * 60);
  out.image = cv::Mat(s, s, CV_8UC3, cv::Scalar(base, base + int(u(rng) * 20), base + int(u(rng) * 20)));
  {  // zero-mean noise from a generator of this sample's own (not OpenCV's global one)
    cv::Mat noise(s, s, CV_16SC3), wide;
    cv::RNG local(rng());
    local.fill(noise, cv::RNG::NORMAL, 0, 6);
    out.image.convertTo(wide, CV_16SC3);
    wide += noise;
    wide.convertTo(out.image, CV_8UC3);
  }

  const int64_t count = options_.min_shapes + int64_t(pick(size_t(options_.max_shapes - options_.min_shapes + 1)));
  for (int64_t k = 0; k < count; ++k) {
    for (int attempt = 0; attempt < 50; ++attempt) {
      SceneObject o;
      o.colour = colours()[pick(colours().size())];
      o.shape = shapes()[pick(shapes().size())];
      // Colours and shapes are unique within a scene, so "What colour is the
      // circle?" and "What shape is red?" always have one answer.
      bool taken = false;
      for (const auto& p : out.objects) taken |= p.colour == o.colour || p.shape == o.shape;
      if (taken) continue;
      const double r = s * (0.10 + 0.08 * u(rng));
      const double cx = r + u(rng) * (s - 2 * r), cy = r + u(rng) * (s * 0.78 - 2 * r);  // bottom strip for text
      o.box = {std::floor(cx - r), std::floor(cy - r), std::ceil(cx + r), std::ceil(cy + r)};
      bool clash = false;
      for (const auto& p : out.objects) clash |= overlaps(o.box, p.box, 2.0);
      if (clash) continue;
      out.objects.push_back(o);
      break;
    }
  }
  // Each object drawn on the image and, with the same calls, on its own mask.
  auto draw = [](const SceneObject& o, cv::Mat& canvas, const cv::Scalar& colour) {
    const cv::Point2d centre((o.box.x1 + o.box.x2) / 2, (o.box.y1 + o.box.y2) / 2);
    const double r = (o.box.x2 - o.box.x1) / 2;
    if (o.shape == "circle") {
      cv::circle(canvas, centre, int(r), colour, cv::FILLED, cv::LINE_AA);
    } else if (o.shape == "square") {
      cv::rectangle(canvas, cv::Point(int(o.box.x1), int(o.box.y1)), cv::Point(int(o.box.x2) - 1, int(o.box.y2) - 1),
                    colour, cv::FILLED);
    } else if (o.shape == "triangle") {
      std::vector<cv::Point> pts{{int(centre.x), int(o.box.y1)}, {int(o.box.x1), int(o.box.y2) - 1},
                                 {int(o.box.x2) - 1, int(o.box.y2) - 1}};
      cv::fillConvexPoly(canvas, pts, colour, cv::LINE_AA);
    } else {
      const int arm = std::max(1, int(r * 0.35));
      cv::rectangle(canvas, cv::Point(int(centre.x) - arm, int(o.box.y1)),
                    cv::Point(int(centre.x) + arm, int(o.box.y2) - 1), colour, cv::FILLED);
      cv::rectangle(canvas, cv::Point(int(o.box.x1), int(centre.y) - arm),
                    cv::Point(int(o.box.x2) - 1, int(centre.y) + arm), colour, cv::FILLED);
    }
  };
  for (auto& o : out.objects) {
    const auto c = colour_rgb(o.colour);
    draw(o, out.image, cv::Scalar(c[0], c[1], c[2]));
    cv::Mat coverage = cv::Mat::zeros(s, s, CV_8UC1);
    draw(o, coverage, cv::Scalar(255));
    o.mask = coverage >= 128;
    o.mask /= 255;
  }
  if (u(rng) < options_.word_probability) {
    out.word = words()[pick(words().size())];
    const double scale = s / 100.0;
    int baseline = 0;
    const auto size = cv::getTextSize(out.word, cv::FONT_HERSHEY_SIMPLEX, scale, std::max(1, s / 64), &baseline);
    const int x = std::max(0, int(u(rng) * std::max(1, s - size.width)));
    cv::putText(out.image, out.word, cv::Point(x, s - baseline - 1), cv::FONT_HERSHEY_SIMPLEX, scale,
                cv::Scalar(255, 255, 255), std::max(1, s / 64), cv::LINE_AA);
    cv::Mat text = cv::Mat::zeros(s, s, CV_8UC1);
    cv::putText(text, out.word, cv::Point(x, s - baseline - 1), cv::FONT_HERSHEY_SIMPLEX, scale, cv::Scalar(255),
                std::max(1, s / 64), cv::LINE_AA);
    for (auto& o : out.objects) o.mask.setTo(0, text >= 128);  // covered by the word
  }
  for (auto& o : out.objects) {
    auto parts = mask_to_polygons(o.mask, /*max_vertices=*/1 << 20);
    if (!parts.empty()) o.polygon = std::move(parts.front());
  }
  // Reading order: left to right.
  std::sort(out.objects.begin(), out.objects.end(),
            [](const SceneObject& a, const SceneObject& b) { return a.box.x1 + a.box.x2 < b.box.x1 + b.box.x2; });

  out.caption = join_objects(out.objects) + (out.word.empty() ? "" : " with the word \"" + out.word + "\"");
  // Questions ask about an object chosen at random (not the leftmost: "the colour
  // of the leftmost blob" would answer every colour question without reading the
  // shape word). Colours and shapes are unique in a scene, so each has one answer.
  const auto& asked = out.objects[pick(out.objects.size())];
  out.questions.push_back({"colour", "What colour is the " + asked.shape + "?", asked.colour});
  const auto& named = out.objects[pick(out.objects.size())];
  out.questions.push_back({"shape", "What shape is " + named.colour + "?", named.shape});
  out.questions.push_back({"count", "How many shapes are there?", std::to_string(out.objects.size())});
  if (out.objects.size() >= 2) {
    // Two different objects at random, asked in an order that makes "yes" and "no"
    // equally likely; objects whose centres are closer than 4 px horizontally are
    // not asked about (left of each other is not clear from the pixels).
    const size_t i = pick(out.objects.size());
    size_t j = pick(out.objects.size() - 1);
    if (j >= i) ++j;
    const SceneObject* a = &out.objects[i];
    const SceneObject* b = &out.objects[j];
    const double ca = (a->box.x1 + a->box.x2) / 2, cb = (b->box.x1 + b->box.x2) / 2;
    const bool want_yes = u(rng) < 0.5;
    if (std::abs(ca - cb) >= 4.0) {
      if ((ca < cb) != want_yes) std::swap(a, b);
      out.questions.push_back({"spatial", "Is the " + a->label() + " left of the " + b->label() + "?", want_yes ? "yes" : "no"});
    }
  }
  nlohmann::ordered_json labels = nlohmann::ordered_json::array(), boxes = nlohmann::ordered_json::array();
  for (const auto& o : out.objects) {
    labels.push_back(o.label());
    boxes.push_back({normalize_coordinate(o.box.x1, s), normalize_coordinate(o.box.y1, s),
                     normalize_coordinate(o.box.x2, s), normalize_coordinate(o.box.y2, s)});
  }
  out.detection = {{"Object", labels}, {"Bounding_box", boxes}};
  const SceneObject* largest = &out.objects.front();
  for (const auto& o : out.objects)
    if (o.box.x2 - o.box.x1 > largest->box.x2 - largest->box.x1) largest = &o;
  nlohmann::ordered_json outlines = nlohmann::ordered_json::array();
  for (const auto& o : out.objects)
    outlines.push_back(o.polygon.size() >= 3 ? polygon_to_json(simplify_polygon(o.polygon, kSegmentVertices), s, s)
                                             : nlohmann::ordered_json::array());
  out.segmentation = {{"Object", labels}, {"Polygon", outlines}};
  {  // chosen last, so that every other part of the scene stays what it was before segmentation existed
    const size_t k = pick(out.objects.size());
    nlohmann::ordered_json one = {{"Object", nlohmann::ordered_json::array({labels[k]})},
                                  {"Polygon", nlohmann::ordered_json::array({outlines[k]})}};
    out.segment = {"segment", "Segment the " + out.objects[k].label() + ".", one.dump()};
  }
  out.extraction = {{"Description", out.caption},
                    {"Colour", largest->colour},
                    {"Shapes", std::to_string(out.objects.size())},
                    {"Text", out.word.empty() ? "none" : out.word}};
  return out;
}

nlohmann::ordered_json SyntheticDataset::manifest_entry(const SyntheticSample& sample, const std::string& image_path) const {
  nlohmann::ordered_json qa = nlohmann::ordered_json::array(), objects = nlohmann::ordered_json::array();
  for (const auto& q : sample.questions) qa.push_back({{"kind", q.kind}, {"question", q.question}, {"answer", q.answer}});
  for (const auto& o : sample.objects)
    objects.push_back({{"label", o.label()},
                       {"box", {o.box.x1, o.box.y1, o.box.x2, o.box.y2}},
                       {"polygon", polygon_to_flat(o.polygon)}});
  return {{"image", image_path},
          {"caption", sample.caption},
          {"questions", qa},
          {"ocr", sample.word},
          {"objects", objects},
          {"detection", sample.detection},
          {"extraction", sample.extraction},
          {"segmentation", sample.segmentation},
          {"segment", {{"question", sample.segment.question}, {"answer", sample.segment.answer}}}};
}

void SyntheticDataset::write(const std::string& directory) const {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(fs::path(directory) / "images", ec);
  TORCH_CHECK_VALUE(!ec, "SyntheticDataset::write: cannot create '", directory, "/images': ", ec.message());
  const auto manifest = fs::path(directory) / "manifest.jsonl";
  const auto partial = fs::path(directory) / "manifest.jsonl.partial";
  {
    std::ofstream out(partial);
    TORCH_CHECK_VALUE(bool(out), "SyntheticDataset::write: cannot write '", partial.string(), "'");
    for (int64_t i = 0; i < size_; ++i) {
      std::ostringstream name;
      name << "images/" << std::setw(6) << std::setfill('0') << i << ".png";
      auto sample = get(i);
      save_png(sample.image, (fs::path(directory) / name.str()).string());
      out << manifest_entry(sample, name.str()).dump() << "\n";
    }
  }
  fs::rename(partial, manifest, ec);  // the manifest appears complete or not at all
  TORCH_CHECK_VALUE(!ec, "SyntheticDataset::write: cannot finish '", manifest.string(), "': ", ec.message());
}

}  // namespace vlmkit
