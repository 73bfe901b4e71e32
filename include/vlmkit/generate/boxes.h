#pragma once
/// Boxes in generated text.
///
/// Convention: a box is written `[x1,y1,x2,y2]` with integer coordinates
/// normalised to 0..999 by the image width (x) and height (y), like Qwen2-VL's
/// 0..1000 grid: n = round(x / width * 999). `parse_boxes` finds every such
/// group in a text (other text, spaces and JSON around it are fine) and maps
/// it back to pixels: x = n / 999 * width.
#include <cstdint>
#include <string>
#include <vector>

namespace vlmkit {

struct Box {
  double x1 = 0, y1 = 0, x2 = 0, y2 = 0;
};

int64_t normalize_coordinate(double pixel, int64_t size);
double denormalize_coordinate(int64_t normalized, int64_t size);
/// "[x1,y1,x2,y2]" for one box.
std::string box_to_text(const Box& box, int64_t width, int64_t height);
/// Every 4-integer bracket group with values in 0..999, in pixels.
std::vector<Box> parse_boxes(const std::string& text, int64_t width, int64_t height);

}  // namespace vlmkit
