#pragma once
// Drawing helpers shared by draw_boxes (image.cpp) and draw_masks (masks.cpp); not installed.
#include <c10/util/Exception.h>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <string>

namespace vlmkit::detail {

inline void check_rgb_image(const cv::Mat& rgb, const char* who) {
  TORCH_CHECK_VALUE(!rgb.empty() && rgb.type() == CV_8UC3, who, ": expected a non-empty RGB uint8 image");
}

/// The i-th colour of an eight-colour palette (RGB) told apart on most backgrounds.
inline cv::Scalar palette_colour(size_t i) {
  static const cv::Scalar palette[] = {{230, 25, 75}, {60, 180, 75}, {0, 130, 200}, {245, 130, 48},
                                       {145, 30, 180}, {70, 240, 240}, {240, 50, 230}, {128, 128, 0}};
  return palette[i % 8];
}

/// White text on a filled strip of `colour` just above (x, y), kept inside the image.
inline void draw_label(cv::Mat& out, const std::string& text, int x, int y, const cv::Scalar& colour) {
  int baseline = 0;
  const double font = std::max(0.35, std::min(out.cols, out.rows) / 600.0);
  const auto size = cv::getTextSize(text, cv::FONT_HERSHEY_SIMPLEX, font, 1, &baseline);
  const int top = std::max(0, y - size.height - baseline - 2);
  cv::rectangle(out, cv::Point(x, top), cv::Point(x + size.width + 2, top + size.height + baseline + 2), colour,
                cv::FILLED);
  cv::putText(out, text, cv::Point(x + 1, top + size.height + 1), cv::FONT_HERSHEY_SIMPLEX, font,
              cv::Scalar(255, 255, 255), 1, cv::LINE_AA);
}

}  // namespace vlmkit::detail
