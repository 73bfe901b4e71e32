// libFuzzer: image decoding and preprocessing of arbitrary bytes.
#include <cstdint>
#include <string>

#include "vlmkit/data/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    // A small pixel budget keeps each run fast; the guard itself is under test.
    auto image = vlmkit::decode_image(bytes, /*max_pixels=*/1 << 20);
    auto square = vlmkit::resize_square(image, 16);
    vlmkit::LetterboxInfo info;
    auto boxed = vlmkit::letterbox(image, 24, &info);
    vlmkit::letterbox_boxes({{0, 0, float(image.cols), float(image.rows)}}, info);
    vlmkit::shortest_side_center_crop(image, 8);
    vlmkit::to_chw_tensor(square, vlmkit::Normalization::preset("clip"));
    vlmkit::tile_image(image, 16, 4, true);
    // The resampler at sizes taken from the input (up and down, odd factors).
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
    vlmkit::decode_image(bytes, 1 << 20, /*min_side=*/8);
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
