// Segmentation masks and their polygons (see data/masks.h).
#include "vlmkit/data/masks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <opencv2/imgproc.hpp>

#include "draw.h"

namespace vlmkit {
namespace {
void check_mask(const cv::Mat& mask, const char* what) {
  TORCH_CHECK_VALUE(!mask.empty() && mask.type() == CV_8UC1, what, ": expected a non-empty single-channel uint8 mask, got ",
                    mask.empty() ? std::string("an empty one") : "type " + std::to_string(mask.type()) + " with " +
                                                                      std::to_string(mask.channels()) + " channels");
}

// Sub-pixels per pixel when tracing: outlines run 1/(2 * kTrace) px inside the
// pixel edges, so every boundary pixel's centre stays inside the polygon. Masks
// whose parts span over kTraceArea pixels are traced at 2 sub-pixels (a quarter
// pixel inside), over 4 * kTraceArea through the boundary pixels' centres (the
// bottom and right boundary rows may then be lost).
constexpr int kTrace = 4;
constexpr int64_t kTraceArea = int64_t(1) << 22;  // 64 MB magnified
// Masks of more pixels than the image pipeline's decompression-bomb guard are refused.
void check_size(int64_t height, int64_t width, const char* who) {
  TORCH_CHECK_VALUE(height > 0 && width > 0 && height <= 1 << 15 && width <= 1 << 15 &&
                        height * width <= kDefaultMaxPixels,
                    who, ": height and width must be in [1, 32768] with at most ", kDefaultMaxPixels,
                    " pixels, got ", height, "x", width);
}

std::vector<cv::Point> to_fixed(const Polygon& polygon, int shift) {
  // Pixel (i, j) is filled by OpenCV when the integer point (i, j) is inside:
  // continuous coordinates move by half a pixel.
  std::vector<cv::Point> out;
  out.reserve(polygon.size());
  const double one = double(1 << shift);
  for (const auto& p : polygon) out.emplace_back(int(std::lround((p.x - 0.5) * one)), int(std::lround((p.y - 0.5) * one)));
  return out;
}

constexpr int kShift = 8;

/// A box as a polygon: its four corners, or three of them when only three fit.
Polygon rectangle(const Box& b, int64_t max_vertices) {
  Polygon out{{b.x1, b.y1}, {b.x2, b.y1}, {b.x2, b.y2}, {b.x1, b.y2}};
  if (max_vertices == 3) out.pop_back();
  return out;
}
}  // namespace

std::vector<Polygon> mask_to_polygons(const cv::Mat& mask, int64_t max_vertices) {
  check_mask(mask, "mask_to_polygons");
  TORCH_CHECK_VALUE(max_vertices >= 3, "mask_to_polygons: max_vertices must be >= 3, got ", max_vertices);
  std::vector<Polygon> out;
  const cv::Rect bounds = cv::boundingRect(mask);
  if (bounds.area() == 0) return out;
  // Trace the parts of the bounding region, magnified kTrace times (nearest), with a
  // one-pixel border so that parts touching the image edge stay closed.
  cv::Mat roi;
  cv::copyMakeBorder(mask(bounds) != 0, roi, 1, 1, 1, 1, cv::BORDER_CONSTANT, cv::Scalar(0));
  const int64_t area = int64_t(bounds.area());
  const int trace = area <= kTraceArea ? kTrace : area <= 4 * kTraceArea ? 2 : 1;
  cv::Mat big;
  if (trace > 1) cv::resize(roi, big, cv::Size(), trace, trace, cv::INTER_NEAREST);
  else big = roi;
  std::vector<std::vector<cv::Point>> contours;
  cv::findContours(big, contours, cv::RETR_EXTERNAL, cv::CHAIN_APPROX_SIMPLE);
  std::vector<std::pair<double, Polygon>> parts;
  for (const auto& contour : contours) {
    Polygon polygon;
    polygon.reserve(contour.size());
    for (const auto& c : contour)
      polygon.push_back({(c.x + 0.5) / trace + bounds.x - 1, (c.y + 0.5) / trace + bounds.y - 1});
    // A part one (sub-)pixel row thick traced at one sub-pixel: its bounding rectangle.
    if (polygon.size() < 3) polygon = rectangle(polygon_bounds(polygon), max_vertices);
    polygon = simplify_polygon(polygon, max_vertices);
    const double area = polygon_area(polygon);
    parts.emplace_back(area, std::move(polygon));
  }
  std::stable_sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (auto& p : parts) out.push_back(std::move(p.second));
  return out;
}

Polygon simplify_polygon(const Polygon& polygon, int64_t max_vertices) {
  TORCH_CHECK_VALUE(max_vertices >= 3, "simplify_polygon: max_vertices must be >= 3, got ", max_vertices);
  TORCH_CHECK_VALUE(polygon.size() >= 3, "simplify_polygon: a polygon needs at least 3 vertices, got ", polygon.size());
  if (int64_t(polygon.size()) <= max_vertices) return polygon;
  std::vector<cv::Point2f> points;  // approxPolyDP takes 32-bit points
  for (const auto& p : polygon) points.emplace_back(float(p.x), float(p.y));
  const Box b = polygon_bounds(polygon);
  const double extent = std::max(b.x2 - b.x1, b.y2 - b.y1) + 1;
  // Douglas-Peucker, the tolerance (pixels) grown until the outline fits; a
  // tolerance near the polygon's size keeps its two extreme points only.
  std::vector<cv::Point2f> simple = points;
  for (double epsilon = 0.2; int64_t(simple.size()) > max_vertices && epsilon < 4 * extent; epsilon *= 1.25)
    cv::approxPolyDP(points, simple, epsilon, /*closed=*/true);
  // Degenerate (a sliver): its bounding rectangle.
  if (simple.size() < 3 || int64_t(simple.size()) > max_vertices) return rectangle(b, max_vertices);
  Polygon out;
  for (const auto& p : simple) out.push_back({double(p.x), double(p.y)});
  return out;
}

Polygon mask_to_polygon(const cv::Mat& mask, int64_t max_vertices) {
  auto parts = mask_to_polygons(mask, max_vertices);
  TORCH_CHECK_VALUE(!parts.empty(), "mask_to_polygon: the mask is empty (no pixel set)");
  return std::move(parts.front());
}

cv::Mat polygon_to_mask(const std::vector<Polygon>& polygons, int64_t height, int64_t width) {
  check_size(height, width, "polygon_to_mask");
  cv::Mat mask = cv::Mat::zeros(int(height), int(width), CV_8UC1);
  std::vector<double> crossings;
  for (const auto& polygon : polygons) {
    TORCH_CHECK_VALUE(polygon.size() >= 3, "polygon_to_mask: a polygon needs at least 3 vertices, got ", polygon.size());
    double top = polygon[0].y, bottom = polygon[0].y;
    for (const auto& p : polygon) {
      TORCH_CHECK_VALUE(std::isfinite(p.x) && std::isfinite(p.y) && std::abs(p.x) < 1e6 && std::abs(p.y) < 1e6,
                        "polygon_to_mask: vertex (", p.x, ", ", p.y, ") is not a finite pixel coordinate");
      top = std::min(top, p.y), bottom = std::max(bottom, p.y);
    }
    // Scanlines through the pixel centres (j + 0.5); an edge counts on the rows
    // whose centre lies in its half-open span, and the pixels whose centres lie
    // between a pair of crossings (even-odd) are inside. OpenCV's fillPoly rounds
    // fractional vertices, which moves edges that fall on half pixels.
    const int64_t first = std::max<int64_t>(0, int64_t(std::ceil(top - 0.5)));
    const int64_t last = std::min<int64_t>(height - 1, int64_t(std::floor(bottom - 0.5)));
    for (int64_t j = first; j <= last; ++j) {
      const double yc = double(j) + 0.5;
      crossings.clear();
      for (size_t i = 0, n = polygon.size(); i < n; ++i) {
        const Point& a = polygon[i];
        const Point& b = polygon[(i + 1) % n];
        if ((a.y <= yc) != (b.y <= yc)) crossings.push_back(a.x + (yc - a.y) / (b.y - a.y) * (b.x - a.x));
      }
      std::sort(crossings.begin(), crossings.end());
      uint8_t* row = mask.ptr<uint8_t>(int(j));
      for (size_t k = 0; k + 1 < crossings.size(); k += 2) {
        const int64_t from = std::max<int64_t>(0, int64_t(std::ceil(crossings[k] - 0.5)));
        const int64_t to = std::min<int64_t>(width - 1, int64_t(std::floor(crossings[k + 1] - 0.5)));
        for (int64_t i = from; i <= to; ++i) row[i] = 1;
      }
    }
  }
  return mask;
}

double mask_iou(const cv::Mat& a, const cv::Mat& b) {
  check_mask(a, "mask_iou");
  check_mask(b, "mask_iou");
  TORCH_CHECK_VALUE(a.size() == b.size(), "mask_iou: masks of different sizes, ", a.cols, "x", a.rows, " and ", b.cols,
                    "x", b.rows);
  const cv::Mat x = a != 0, y = b != 0;
  const double inter = cv::countNonZero(x & y), uni = cv::countNonZero(x | y);
  return uni > 0 ? inter / uni : 0.0;
}

// ---------------------------------------------------------------- COCO RLE
cv::Mat decode_coco_rle(const std::vector<int64_t>& counts, int64_t height, int64_t width) {
  check_size(height, width, "COCO RLE");
  // Column-major runs: transpose at the end.
  cv::Mat columns = cv::Mat::zeros(int(width), int(height), CV_8UC1);
  const int64_t total = height * width;
  int64_t at = 0;
  uint8_t value = 0;
  for (const auto run : counts) {
    TORCH_CHECK_VALUE(run >= 0 && run <= total - at, "COCO RLE: the runs add up to more than ", height, "x", width,
                      " = ", total, " pixels (or one is negative)");
    if (value) std::fill(columns.data + at, columns.data + at + run, uint8_t(1));
    at += run;
    value ^= 1;
  }
  TORCH_CHECK_VALUE(at == total, "COCO RLE: the runs cover ", at, " pixels, expected ", height, "x", width, " = ", total);
  return columns.t();
}

cv::Mat decode_coco_rle(const std::string& counts, int64_t height, int64_t width) {
  // pycocotools' compressed counts: 5 bits per character (offset 48), bit 0x20
  // continues, bit 0x10 of the last one is the sign; from the third run on each
  // holds the difference to the run two before.
  std::vector<int64_t> runs;
  size_t p = 0;
  while (p < counts.size()) {
    int64_t x = 0;
    int k = 0;
    bool more = true;
    while (more) {
      TORCH_CHECK_VALUE(p < counts.size(), "COCO RLE: the compressed counts end inside a number");
      const int c = int(static_cast<unsigned char>(counts[p])) - 48;
      TORCH_CHECK_VALUE(c >= 0 && c < 64 && k < 12, "COCO RLE: character '", counts[p],
                        "' at ", p, " is not compressed counts");
      x |= int64_t(c & 0x1f) << (5 * k);
      more = c & 0x20;
      ++p;
      ++k;
      if (!more && (c & 0x10)) x |= -(int64_t(1) << (5 * k));
    }
    if (runs.size() > 2) x += runs[runs.size() - 2];
    runs.push_back(x);
  }
  return decode_coco_rle(runs, height, width);
}

std::string encode_coco_rle(const cv::Mat& mask) {
  check_mask(mask, "encode_coco_rle");
  const cv::Mat columns = (mask != 0).t();
  std::vector<int64_t> runs;
  uint8_t value = 0;
  int64_t run = 0;
  const cv::Mat flat = columns.isContinuous() ? columns : columns.clone();
  for (int64_t i = 0, n = int64_t(flat.total()); i < n; ++i) {
    const uint8_t v = flat.data[i] ? 1 : 0;
    if (v != value) {
      runs.push_back(run);
      run = 0;
      value = v;
    }
    ++run;
  }
  runs.push_back(run);
  std::string out;
  for (size_t i = 0; i < runs.size(); ++i) {
    int64_t x = runs[i];
    if (i > 2) x -= runs[i - 2];
    bool more = true;
    while (more) {
      int c = int(x & 0x1f);
      x >>= 5;
      more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      out.push_back(char(c + 48));
    }
  }
  return out;
}

// ---------------------------------------------------------------- transforms
namespace {
template <typename F>
std::vector<Polygon> map_points(const std::vector<Polygon>& polygons, F f) {
  std::vector<Polygon> out = polygons;
  for (auto& polygon : out)
    for (auto& p : polygon) p = f(p);
  return out;
}
}  // namespace

std::vector<Polygon> letterbox_polygons(const std::vector<Polygon>& polygons, const LetterboxInfo& info) {
  return map_points(polygons, [&](Point p) {
    return Point{p.x * info.scale_x + double(info.pad_x), p.y * info.scale_y + double(info.pad_y)};
  });
}

std::vector<Polygon> flip_polygons(const std::vector<Polygon>& polygons, int64_t width) {
  return map_points(polygons, [&](Point p) { return Point{double(width) - p.x, p.y}; });
}

std::vector<Polygon> scale_polygons(const std::vector<Polygon>& polygons, double scale_x, double scale_y) {
  return map_points(polygons, [&](Point p) { return Point{p.x * scale_x, p.y * scale_y}; });
}

std::vector<Polygon> crop_polygons(const std::vector<Polygon>& polygons, double x, double y, double w, double h,
                                   double scale_x, double scale_y) {
  TORCH_CHECK_VALUE(w > 0 && h > 0, "crop_polygons: the crop must have a positive size, got ", w, "x", h);
  std::vector<Polygon> out;
  for (const auto& polygon : polygons) {
    Polygon current = polygon;
    // Sutherland-Hodgman against each edge of the crop: keep where inside(p) holds.
    auto clip = [&](auto inside, auto cross) {
      Polygon next;
      for (size_t i = 0, n = current.size(); i < n; ++i) {
        const Point& a = current[i];
        const Point& b = current[(i + 1) % n];
        const bool ia = inside(a), ib = inside(b);
        if (ia) next.push_back(a);
        if (ia != ib) next.push_back(cross(a, b));
      }
      current = std::move(next);
    };
    auto at_x = [](double edge) {
      return [edge](const Point& a, const Point& b) {
        const double t = (edge - a.x) / (b.x - a.x);
        return Point{edge, a.y + t * (b.y - a.y)};
      };
    };
    auto at_y = [](double edge) {
      return [edge](const Point& a, const Point& b) {
        const double t = (edge - a.y) / (b.y - a.y);
        return Point{a.x + t * (b.x - a.x), edge};
      };
    };
    clip([&](const Point& p) { return p.x >= x; }, at_x(x));
    clip([&](const Point& p) { return p.x <= x + w; }, at_x(x + w));
    clip([&](const Point& p) { return p.y >= y; }, at_y(y));
    clip([&](const Point& p) { return p.y <= y + h; }, at_y(y + h));
    if (current.size() < 3 || polygon_area(current) <= 0) current.clear();
    for (auto& p : current) p = {(p.x - x) * scale_x, (p.y - y) * scale_y};
    out.push_back(std::move(current));
  }
  return out;
}

// ---------------------------------------------------------------- drawing
cv::Mat draw_masks(const cv::Mat& rgb, const std::vector<Polygon>& polygons, const std::vector<std::string>& labels,
                   double alpha) {
  detail::check_rgb_image(rgb, "draw_masks");
  TORCH_CHECK_VALUE(labels.empty() || labels.size() == polygons.size(), "draw_masks: expected ", polygons.size(),
                    " labels (one per polygon) or none, got ", labels.size());
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "draw_masks: alpha must be in [0, 1], got ", alpha);
  cv::Mat out = rgb.clone();
  const int thickness = std::max(1, std::min(out.cols, out.rows) / 200);
  for (size_t i = 0; i < polygons.size(); ++i) {
    if (polygons[i].size() < 3) continue;
    const auto colour = detail::palette_colour(i);
    const auto region = polygon_to_mask({polygons[i]}, out.rows, out.cols);
    cv::Mat tinted(out.size(), out.type(), colour);
    cv::Mat blended;
    cv::addWeighted(out, 1.0 - alpha, tinted, alpha, 0.0, blended);
    blended.copyTo(out, region);
    std::vector<std::vector<cv::Point>> outline{to_fixed(polygons[i], kShift)};
    cv::polylines(out, outline, /*isClosed=*/true, colour, thickness, cv::LINE_AA, kShift);
    if (!labels.empty() && !labels[i].empty()) {
      const Box b = polygon_bounds(polygons[i]);
      detail::draw_label(out, labels[i], int(b.x1), int(b.y1), colour);
    }
  }
  return out;
}

}  // namespace vlmkit
