#pragma once
/// Object outlines (segmentation masks) in generated text, in the spirit of
/// boxes.h.
///
/// Convention: an outline is a polygon written `[x1,y1,x2,y2,...,xn,yn]` with
/// n >= 3 vertices on the 0..999 grid of boxes.h (x by the width, y by the
/// height). Coordinates are continuous pixels: pixel (i, j) covers
/// [i, i + 1) x [j, j + 1), and a mask holds the pixels whose centres lie
/// inside (or on) the polygon. The segmentation answer is
///   {"Object": [labels], "Polygon": [[x1, y1, ...], ...]}
/// with one polygon per object, beside the detection answer's "Bounding_box".
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "vlmkit/generate/boxes.h"

namespace vlmkit {

struct Point {
  double x = 0, y = 0;
};
using Polygon = std::vector<Point>;

/// COCO's form of a polygon in pixels: [x1, y1, x2, y2, ...].
std::vector<double> polygon_to_flat(const Polygon& polygon);
/// From COCO's form: an even count >= 6 of finite numbers, or ValueError naming `who`.
Polygon polygon_from_flat(const std::vector<double>& flat, const char* who);

/// "[x1,y1,...]" on the 0..999 grid of a width x height image.
std::string polygon_to_text(const Polygon& polygon, int64_t width, int64_t height);
/// The polygon as a JSON array of 0..999 integers (what polygon_to_text writes).
nlohmann::ordered_json polygon_to_json(const Polygon& polygon, int64_t width, int64_t height);
/// Every bracket group of 6 or more comma-separated integers, all in 0..999, in
/// pixels; a group with an odd count drops its last number (a generation cut
/// short). Groups of 4 (boxes) are not polygons and are skipped.
std::vector<Polygon> parse_polygons(const std::string& text, int64_t width, int64_t height);
/// The segmentation answer {"Object": labels, "Polygon": polygons on the grid}.
std::string segmentation_answer(const std::vector<std::string>& labels, const std::vector<Polygon>& polygons,
                                int64_t width, int64_t height);
/// Shoelace area in square pixels (positive whatever the orientation).
double polygon_area(const Polygon& polygon);
/// The bounding rectangle of a non-empty polygon.
Box polygon_bounds(const Polygon& polygon);

}  // namespace vlmkit
