// libFuzzer: image decoding and preprocessing of arbitrary bytes.
#include <cstdint>
#include <string>

#include "vlmkit/data/image.h"

namespace {
// Property: a decoded image has the size its header declares (divided, rounding
// up, by the JPEG draft scale; an EXIF-rotated JPEG may come out transposed), is
// RGB uint8 and not empty. Anything else must have been a clear error instead.
void check_declared_size(const cv::Mat& image, const std::string& bytes, bool draft) {
  if (image.empty() || image.type() != CV_8UC3) __builtin_trap();
  const auto declared = vlmkit::peek_image_size(bytes);
  if (declared[0] <= 0 || declared[1] <= 0) return;  // TIFF or unknown: no header size to hold it to
  const bool jpeg = bytes.size() > 2 && uint8_t(bytes[0]) == 0xFF && uint8_t(bytes[1]) == 0xD8;
  for (int64_t d : {1, 2, 4, 8}) {
    if (d > 1 && !draft) break;
    const int64_t w = (declared[0] + d - 1) / d, h = (declared[1] + d - 1) / d;
    if (image.cols == w && image.rows == h) return;
    if (jpeg && image.cols == h && image.rows == w) return;
  }
  __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    // A small pixel budget keeps each run fast; the guard itself is under test.
    auto image = vlmkit::decode_image(bytes, /*max_pixels=*/1 << 20);
    check_declared_size(image, bytes, false);
    auto square = vlmkit::resize_square(image, 16);
    vlmkit::LetterboxInfo info;
    auto boxed = vlmkit::letterbox(image, 24, &info);
    vlmkit::letterbox_boxes({{0, 0, float(image.cols), float(image.rows)}}, info);
    vlmkit::shortest_side_center_crop(image, 8);
    vlmkit::to_chw_tensor(square, vlmkit::Normalization::preset("clip"));
    vlmkit::tile_image(image, 16, 4, true);
    // The image resize kernel at sizes taken from the input (up and down, odd factors).
    const int64_t w = 1 + (size > 0 ? data[0] % 97 : 0), h = 1 + (size > 1 ? data[1] % 89 : 0);
    vlmkit::resize_image(image, w, h);
    const auto dyn = vlmkit::dynamic_resolution(image.rows, image.cols, 4, 2, 64, 4096);
    auto resized = vlmkit::resize_image(image, dyn[1], dyn[0]);
    vlmkit::collate_images({vlmkit::to_chw_tensor(resized), vlmkit::to_chw_tensor(boxed)}, 8);
  } catch (const c10::Error&) {
    // Clear errors are the expected outcome for bad input.
  }
  try {
    // JPEG draft decoding (DCT-scaled) as the loader does it.
    check_declared_size(vlmkit::decode_image(bytes, 1 << 20, /*min_side=*/8), bytes, true);
  } catch (const c10::Error&) {
    // Clear errors are the expected outcome for bad input.
  }
  try {
    vlmkit::decode_data_url("data:image/png;base64," + bytes, 1 << 20);
  } catch (const c10::Error&) {
  }
  try {
    vlmkit::peek_image_size(bytes);
  } catch (const c10::Error&) {
  }
  return 0;
}
