// Boxes as text: 0..999 coordinates (generate/boxes.h).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <map>
#include <regex>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/generate/boxes.h"
#include "vlmkit/generate/json_schema.h"
#include "vlmkit/models/generative.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
using detail::shape_str;

int64_t normalize_coordinate(double pixel, int64_t size) {
  TORCH_CHECK_VALUE(size > 0, "box coordinates need a positive image size, got ", size);
  const double n = std::round(pixel / double(size) * 999.0);
  return static_cast<int64_t>(std::min(999.0, std::max(0.0, n)));
}

double denormalize_coordinate(int64_t normalized, int64_t size) {
  return double(normalized) / 999.0 * double(size);
}

std::string box_to_text(const Box& box, int64_t width, int64_t height) {
  std::ostringstream s;
  s << "[" << normalize_coordinate(box.x1, width) << "," << normalize_coordinate(box.y1, height) << ","
    << normalize_coordinate(box.x2, width) << "," << normalize_coordinate(box.y2, height) << "]";
  return s.str();
}

std::vector<Box> parse_boxes(const std::string& text, int64_t width, int64_t height) {
  TORCH_CHECK_VALUE(width > 0 && height > 0, "parse_boxes: image size must be positive, got ", width,
                    "x", height);
  static const std::regex pattern(R"(\[\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\])");
  std::vector<Box> boxes;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), pattern); it != std::sregex_iterator(); ++it) {
    const auto& m = *it;
    int64_t v[4];
    for (int j = 0; j < 4; ++j) v[j] = std::stoll(m[j + 1].str());
    if (v[0] > 999 || v[1] > 999 || v[2] > 999 || v[3] > 999) continue;
    boxes.push_back({denormalize_coordinate(v[0], width), denormalize_coordinate(v[1], height),
                     denormalize_coordinate(v[2], width), denormalize_coordinate(v[3], height)});
  }
  return boxes;
}
}  // namespace vlmkit
