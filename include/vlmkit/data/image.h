#pragma once
/// The OpenCV image pipeline (optional component, VLMKIT_WITH_OPENCV): decoding
/// from any source to RGB, resize policies, normalisation to tensors,
/// box-aware augmentation and drawing.
#include <opencv2/core.hpp>
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "vlmkit/generate/boxes.h"
#include "vlmkit/generate/polygons.h"

namespace vlmkit {

/// Raised for paths that do not exist (Python: FileNotFoundError).
struct FileNotFoundError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Default decompression-bomb guard: 64 megapixels.
constexpr int64_t kDefaultMaxPixels = 64LL * 1000 * 1000;

/// Decodes JPEG, PNG, BMP, TIFF, WebP bytes to an RGB uint8 image (CV_8UC3).
/// Grayscale and palette images become RGB, 16-bit images are scaled to 8
/// bits, alpha is composited over white, JPEG EXIF orientation is applied.
/// Images over max_pixels raise ValueError (checked from the header before
/// decoding where the format allows). Empty, truncated or non-image bytes
/// raise ValueError naming what was found, and so does a file whose decoded
/// size is not the size its header declares (see peek_image_size).
///
/// min_side > 0 allows a JPEG to be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
/// DCT scaling, like PIL's draft mode) as long as both sides stay >= min_side:
/// several times faster when the image is about to be shrunk anyway.
cv::Mat decode_image(const std::string& bytes, int64_t max_pixels = kDefaultMaxPixels, int64_t min_side = 0);
/// Reads and decodes a file; a missing file raises FileNotFoundError.
cv::Mat load_image(const std::string& path, int64_t max_pixels = kDefaultMaxPixels, int64_t min_side = 0);
/// "data:image/jpeg;base64,...".
cv::Mat decode_data_url(const std::string& url, int64_t max_pixels = kDefaultMaxPixels, int64_t min_side = 0);
std::string base64_decode(const std::string& text);
/// H x W x C uint8 array (C = 1, 3 RGB or 4 RGBA), copied.
cv::Mat image_from_array(const uint8_t* data, int64_t height, int64_t width, int64_t channels);
/// [H, W, C] uint8 or [C, H, W] floating in [0, 1] tensor.
cv::Mat image_from_tensor(const torch::Tensor& image);
/// [H, W, 3] uint8 tensor (a copy).
torch::Tensor image_to_tensor(const cv::Mat& rgb);
/// Width and height from the header of PNG, JPEG, BMP, GIF, WebP bytes; {0, 0} if unknown.
std::array<int64_t, 2> peek_image_size(const std::string& bytes);

// ---------------------------------------------------------------- resizing
/// Aspect kept, scaled to fit size x size, padded (centered) with `fill`.
struct LetterboxInfo {
  double scale_x = 1.0, scale_y = 1.0;  // resized size / original size, per axis
  int64_t pad_x = 0, pad_y = 0;
};
cv::Mat resize_square(const cv::Mat& rgb, int64_t size);
/// To width x height with PIL's bilinear resampling (a triangle filter widened
/// by the shrink factor, so downscaling is anti-aliased): byte for byte what
/// PIL's Image.resize(..., BILINEAR), and so torchvision's Resize, produces.
/// Every resize policy below uses it.
cv::Mat resize_image(const cv::Mat& rgb, int64_t width, int64_t height);
cv::Mat letterbox(const cv::Mat& rgb, int64_t size, LetterboxInfo* info = nullptr, int fill = 114);
/// Maps pixel boxes of the original image into the letterboxed one.
std::vector<Box> letterbox_boxes(const std::vector<Box>& boxes, const LetterboxInfo& info);
/// Shortest side to `size`, then the central size x size crop.
cv::Mat shortest_side_center_crop(const cv::Mat& rgb, int64_t size);
/// Qwen2-VL's smart resize: (height, width) rounded to multiples of
/// factor = patch * merge, keeping the aspect, within [min_pixels, max_pixels].
std::array<int64_t, 2> dynamic_resolution(int64_t height, int64_t width, int64_t patch, int64_t merge,
                                          int64_t min_pixels, int64_t max_pixels);
/// nanoVLM / Idefics3 tiling: the image resized to a rows x cols grid of
/// tile x tile crops (grid chosen to keep the aspect, at most max_tiles),
/// plus a global view (the whole image at tile x tile) first when asked.
std::vector<cv::Mat> tile_image(const cv::Mat& rgb, int64_t tile, int64_t max_tiles, bool global_view,
                                std::array<int64_t, 2>* grid = nullptr);

// ---------------------------------------------------------------- tensors
struct Normalization {
  std::array<double, 3> mean{0.0, 0.0, 0.0};
  std::array<double, 3> std{1.0, 1.0, 1.0};
  /// "clip", "siglip", "imagenet" or "none".
  static Normalization preset(const std::string& name);
};
/// RGB uint8 -> [3, H, W] float32, (x / 255 - mean) / std.
torch::Tensor to_chw_tensor(const cv::Mat& rgb, const Normalization& norm = {});
/// The same into the top-left H x W corner of `out`, a float32 CPU tensor
/// [3, H', W'] with H' >= H and W' >= W whose rows are contiguous (a batch
/// slot); the rest of `out` is left as it is.
void write_chw(const cv::Mat& rgb, const Normalization& norm, const torch::Tensor& out);

/// Images of different sizes in one batch (dynamic resolution).
struct ImageBatch {
  torch::Tensor images;       // [B, C, H, W]: each image top-left, zeros elsewhere
  torch::Tensor image_sizes;  // [B, 2] int64: (height, width) of each image
};
/// Pads [C, h, w] tensors (one dtype, one channel count) into one batch whose
/// H and W are the largest heights and widths rounded up to `multiple`. The
/// models take image_sizes to mask the padded patches (ViT) and pack the
/// image tokens (concat fusion).
ImageBatch collate_images(const std::vector<torch::Tensor>& images, int64_t multiple = 1);

// ---------------------------------------------------------------- augmentation
/// Mirrors the image, and boxes and polygons (data/masks.h) with it.
cv::Mat horizontal_flip(const cv::Mat& rgb, std::vector<Box>* boxes = nullptr, std::vector<Polygon>* polygons = nullptr);
/// torchvision's RandomResizedCrop: area in `scale`, aspect in `ratio`, then
/// resized to size x size; boxes are mapped and clipped, polygons clipped to the
/// crop. Given both, boxes[i] and polygons[i] are one object and an object cut
/// off entirely (empty box or polygon) leaves both lists.
cv::Mat random_resized_crop(const cv::Mat& rgb, int64_t size, std::mt19937_64& rng,
                            std::array<double, 2> scale = {0.5, 1.0},
                            std::array<double, 2> ratio = {3.0 / 4.0, 4.0 / 3.0},
                            std::vector<Box>* boxes = nullptr, std::vector<Polygon>* polygons = nullptr);
/// Brightness, contrast and saturation factors drawn from [1 - x, 1 + x].
cv::Mat color_jitter(const cv::Mat& rgb, std::mt19937_64& rng, double brightness = 0.2,
                     double contrast = 0.2, double saturation = 0.2);

// ---------------------------------------------------------------- drawing
/// Boxes (pixels) and labels drawn on a copy of the image.
cv::Mat draw_boxes(const cv::Mat& rgb, const std::vector<Box>& boxes, const std::vector<std::string>& labels);
/// Writes RGB as PNG; raises ValueError when it cannot.
void save_png(const cv::Mat& rgb, const std::string& path);
/// A grid of images (resized to the first one's size) with a caption strip
/// under each, written as PNG and returned.
cv::Mat save_grid(const std::vector<cv::Mat>& images, const std::vector<std::string>& texts,
                  const std::string& path, int64_t columns = 4);

}  // namespace vlmkit
