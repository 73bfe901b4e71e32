// Object outlines in generated text (see generate/polygons.h).
#include "vlmkit/generate/polygons.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <sstream>

namespace vlmkit {

std::vector<double> polygon_to_flat(const Polygon& polygon) {
  std::vector<double> out;
  out.reserve(2 * polygon.size());
  for (const auto& p : polygon) out.push_back(p.x), out.push_back(p.y);
  return out;
}

Polygon polygon_from_flat(const std::vector<double>& flat, const char* who) {
  TORCH_CHECK_VALUE(flat.size() >= 6 && flat.size() % 2 == 0, who,
                    ": a polygon is a flat list [x1, y1, x2, y2, x3, y3, ...] of an even count >= 6, got ", flat.size(),
                    " numbers");
  Polygon out;
  out.reserve(flat.size() / 2);
  for (size_t i = 0; i < flat.size(); i += 2) {
    TORCH_CHECK_VALUE(std::isfinite(flat[i]) && std::isfinite(flat[i + 1]), who, ": polygon vertex (", flat[i], ", ",
                      flat[i + 1], ") is not finite");
    out.push_back({flat[i], flat[i + 1]});
  }
  return out;
}

nlohmann::ordered_json polygon_to_json(const Polygon& polygon, int64_t width, int64_t height) {
  TORCH_CHECK_VALUE(polygon.size() >= 3, "a polygon needs at least 3 vertices, got ", polygon.size());
  auto out = nlohmann::ordered_json::array();
  for (const auto& p : polygon) {
    TORCH_CHECK_VALUE(std::isfinite(p.x) && std::isfinite(p.y), "polygon vertex (", p.x, ", ", p.y, ") is not finite");
    out.push_back(normalize_coordinate(p.x, width));
    out.push_back(normalize_coordinate(p.y, height));
  }
  return out;
}

std::string polygon_to_text(const Polygon& polygon, int64_t width, int64_t height) {
  return polygon_to_json(polygon, width, height).dump();
}

std::vector<Polygon> parse_polygons(const std::string& text, int64_t width, int64_t height) {
  TORCH_CHECK_VALUE(width > 0 && height > 0, "parse_polygons: image size must be positive, got ", width, "x", height);
  std::vector<Polygon> out;
  const size_t n = text.size();
  for (size_t i = 0; i < n; ++i) {
    if (text[i] != '[') continue;
    // A group is '[' integer (',' integer)* ']' with spaces allowed around the numbers.
    std::vector<int64_t> values;
    size_t j = i + 1;
    bool ok = true, expect_number = true;
    while (j < n) {
      const char c = text[j];
      if (std::isspace(static_cast<unsigned char>(c))) {
        ++j;
      } else if (expect_number && std::isdigit(static_cast<unsigned char>(c))) {
        int64_t v = 0;
        size_t digits = 0;
        while (j < n && std::isdigit(static_cast<unsigned char>(text[j]))) {
          if (++digits <= 4) v = v * 10 + (text[j] - '0');
          ++j;
        }
        if (digits > 3 || v > 999) ok = false;
        values.push_back(v);
        expect_number = false;
      } else if (!expect_number && c == ',') {
        expect_number = true;
        ++j;
      } else if (!expect_number && c == ']') {
        break;
      } else {
        ok = false;
        break;
      }
    }
    if (!ok || j >= n || text[j] != ']') continue;  // not a group of integers (nested, cut off, other values)
    if (values.size() % 2) values.pop_back();
    if (values.size() < 6) continue;
    Polygon polygon;
    for (size_t k = 0; k < values.size(); k += 2)
      polygon.push_back({denormalize_coordinate(values[k], width), denormalize_coordinate(values[k + 1], height)});
    out.push_back(std::move(polygon));
    i = j;
  }
  return out;
}

std::string segmentation_answer(const std::vector<std::string>& labels, const std::vector<Polygon>& polygons,
                                int64_t width, int64_t height) {
  TORCH_CHECK_VALUE(labels.size() == polygons.size(), "segmentation_answer: expected one label per polygon, got ",
                    labels.size(), " labels and ", polygons.size(), " polygons");
  auto objects = nlohmann::ordered_json::array(), outlines = nlohmann::ordered_json::array();
  for (size_t i = 0; i < polygons.size(); ++i) {
    objects.push_back(labels[i]);
    outlines.push_back(polygon_to_json(polygons[i], width, height));
  }
  return nlohmann::ordered_json{{"Object", objects}, {"Polygon", outlines}}.dump();
}

double polygon_area(const Polygon& polygon) {
  double twice = 0;
  for (size_t i = 0, n = polygon.size(); i < n; ++i) {
    const auto& a = polygon[i];
    const auto& b = polygon[(i + 1) % n];
    twice += a.x * b.y - b.x * a.y;
  }
  return std::abs(twice) / 2;
}

Box polygon_bounds(const Polygon& polygon) {
  TORCH_CHECK_VALUE(!polygon.empty(), "polygon_bounds: the polygon has no vertex");
  Box b{polygon[0].x, polygon[0].y, polygon[0].x, polygon[0].y};
  for (const auto& p : polygon) {
    b.x1 = std::min(b.x1, p.x), b.y1 = std::min(b.y1, p.y);
    b.x2 = std::max(b.x2, p.x), b.y2 = std::max(b.y2, p.y);
  }
  return b;
}

}  // namespace vlmkit
