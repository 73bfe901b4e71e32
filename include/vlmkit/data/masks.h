#pragma once
/// Segmentation masks (optional OpenCV component): exact masks to the bounded
/// polygons a decoder writes and back, COCO's run-length encoding, mask IoU,
/// the geometric transforms of the image pipeline applied to polygons, and
/// drawing. Polygon coordinates follow generate/polygons.h: continuous pixels,
/// a mask holds the pixels whose centres lie inside the polygon.
#include <opencv2/core.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "vlmkit/data/image.h"
#include "vlmkit/generate/polygons.h"

namespace vlmkit {

/// Default bound on the vertices of a polygon written as text.
constexpr int64_t kDefaultMaxVertices = 12;

/// The outlines of a mask's parts (CV_8U, non-zero = inside), largest area
/// first, each simplified (Douglas-Peucker, the tolerance grown until it fits)
/// to at most max_vertices >= 3 vertices. Parts are traced on the pixel edges
/// (not through the boundary pixels' centres), so polygon_to_mask gives the
/// mask back, exactly before simplification (for parts spanning up to 16
/// megapixels; beyond, traced through the boundary pixels' centres, the mask
/// can lose its bottom and right boundary pixels); holes are not kept. An empty
/// mask gives no polygon.
std::vector<Polygon> mask_to_polygons(const cv::Mat& mask, int64_t max_vertices = kDefaultMaxVertices);
/// The largest part's outline; ValueError for an empty mask.
Polygon mask_to_polygon(const cv::Mat& mask, int64_t max_vertices = kDefaultMaxVertices);
/// The polygon with at most max_vertices >= 3 vertices (Douglas-Peucker, the
/// tolerance grown until it fits); unchanged when it already fits.
Polygon simplify_polygon(const Polygon& polygon, int64_t max_vertices = kDefaultMaxVertices);
/// A height x width CV_8U mask (1 inside, 0 outside) of the union of the
/// polygons: the pixels whose centres lie inside one (even-odd rule, computed
/// exactly; a centre on the outline is inside, except on a bottom edge).
/// Masks (here and from RLE) are at most kDefaultMaxPixels.
cv::Mat polygon_to_mask(const std::vector<Polygon>& polygons, int64_t height, int64_t width);
/// Intersection over union of two same-size masks; 0 when both are empty.
double mask_iou(const cv::Mat& a, const cv::Mat& b);

/// COCO run-length encoding (column-major runs, starting with zeros): `counts`
/// as the list of run lengths, or as COCO's compressed string (pycocotools'
/// LEB128-like encoding). Raises ValueError when the runs do not add up to
/// height x width.
cv::Mat decode_coco_rle(const std::vector<int64_t>& counts, int64_t height, int64_t width);
cv::Mat decode_coco_rle(const std::string& counts, int64_t height, int64_t width);
/// The compressed string of a mask (what pycocotools writes).
std::string encode_coco_rle(const cv::Mat& mask);

// ---------------------------------------------------------------- transforms
/// Polygons moved as letterbox(...) moves the pixels.
std::vector<Polygon> letterbox_polygons(const std::vector<Polygon>& polygons, const LetterboxInfo& info);
/// Polygons mirrored as horizontal_flip mirrors an image `width` pixels wide.
std::vector<Polygon> flip_polygons(const std::vector<Polygon>& polygons, int64_t width);
/// Every coordinate scaled (a resize from one size to another).
std::vector<Polygon> scale_polygons(const std::vector<Polygon>& polygons, double scale_x, double scale_y);
/// Clipped to the rectangle [x, x + w) x [y, y + h) (Sutherland-Hodgman), moved
/// to its origin and scaled by (scale_x, scale_y): what a crop followed by a
/// resize does. A polygon wholly outside comes back empty.
std::vector<Polygon> crop_polygons(const std::vector<Polygon>& polygons, double x, double y, double w, double h,
                                   double scale_x = 1.0, double scale_y = 1.0);

// ---------------------------------------------------------------- drawing
/// Each polygon filled in a translucent colour (alpha), outlined in the same
/// colour and labelled, on a copy of the image; labels one per polygon or none.
cv::Mat draw_masks(const cv::Mat& rgb, const std::vector<Polygon>& polygons, const std::vector<std::string>& labels,
                   double alpha = 0.45);

}  // namespace vlmkit
