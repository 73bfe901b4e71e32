// The OpenCV image pipeline (see data/image.h).
#include "vlmkit/data/image.h"

#include "draw.h"
#include "vlmkit/data/masks.h"

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <limits>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sstream>

// libjpeg-turbo's libjpeg API (the library OpenCV and PIL decode JPEGs with on
// Debian), used directly for the common JPEG case; see decode_jpeg_direct.
#include <csetjmp>
#include <cstdio>
#include <jpeglib.h>

namespace vlmkit {
namespace {
uint32_t be16(const std::string& b, size_t i) {
  return (uint32_t(uint8_t(b[i])) << 8) | uint8_t(b[i + 1]);
}
uint32_t be32(const std::string& b, size_t i) { return (be16(b, i) << 16) | be16(b, i + 2); }
uint32_t le16(const std::string& b, size_t i) {
  return uint32_t(uint8_t(b[i])) | (uint32_t(uint8_t(b[i + 1])) << 8);
}
uint32_t le24(const std::string& b, size_t i) { return le16(b, i) | (uint32_t(uint8_t(b[i + 2])) << 16); }

std::string hex_prefix(const std::string& bytes) {
  std::ostringstream s;
  for (size_t i = 0; i < std::min<size_t>(8, bytes.size()); ++i)
    s << (i ? " " : "") << std::hex << std::setw(2) << std::setfill('0') << int(uint8_t(bytes[i]));
  return s.str();
}

bool is_jpeg(const std::string& b) {
  return b.size() >= 3 && uint8_t(b[0]) == 0xFF && uint8_t(b[1]) == 0xD8 && uint8_t(b[2]) == 0xFF;
}

/// The formats decode_image documents, by signature. Everything else is refused
/// before OpenCV sees it: its other decoders (DICOM through GDCM, PxM, Sun raster,
/// HDR, JPEG 2000, ...) are not what vlmkit promises, and GDCM aborts the process
/// on some malformed files (found by fuzz_image).
bool is_supported_format(const std::string& b) {
  const size_t n = b.size();
  if (is_jpeg(b)) return true;
  if (n >= 8 && b.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0) return true;
  if (n >= 2 && b[0] == 'B' && b[1] == 'M') return true;
  if (n >= 4 && (b.compare(0, 4, std::string("II*\0", 4)) == 0 || b.compare(0, 4, std::string("MM\0*", 4)) == 0))
    return true;
  return n >= 12 && b.compare(0, 4, "RIFF") == 0 && b.compare(8, 4, "WEBP") == 0;
}

void check_pixels(int64_t width, int64_t height, int64_t max_pixels) {
  TORCH_CHECK_VALUE(width >= 0 && height >= 0, "image header declares a negative size ", width, "x", height);
  // Divide rather than multiply: headers may declare sizes whose product overflows
  // (found by fuzz_image; regression input in tests/fuzz/corpus/fuzz_image).
  TORCH_CHECK_VALUE(height == 0 || width <= max_pixels / height, "image of ", width, "x", height,
                    " pixels exceeds the limit of ", max_pixels,
                    " pixels (a decompression-bomb guard; raise max_pixels to allow it)");
}

/// Any decoded Mat (1/3/4 channels BGR order, 8/16-bit or float) -> RGB uint8.
cv::Mat to_rgb8(const cv::Mat& decoded, bool bgr_order) {
  cv::Mat img = decoded;
  if (img.depth() == CV_16U) {
    img.convertTo(img, CV_8U, 1.0 / 257.0);
  } else if (img.depth() == CV_32F || img.depth() == CV_64F) {
    img.convertTo(img, CV_8U, 255.0);
  } else if (img.depth() != CV_8U) {
    img.convertTo(img, CV_8U);
  }
  cv::Mat rgb;
  switch (img.channels()) {
    case 1: cv::cvtColor(img, rgb, cv::COLOR_GRAY2RGB); break;
    case 2: {  // gray + alpha
      std::vector<cv::Mat> ch;
      cv::split(img, ch);
      cv::Mat four;
      cv::merge(std::vector<cv::Mat>{ch[0], ch[0], ch[0], ch[1]}, four);
      return to_rgb8(four, true);
    }
    case 3:
      if (bgr_order) cv::cvtColor(img, rgb, cv::COLOR_BGR2RGB);
      else rgb = img.clone();
      break;
    case 4: {  // composite over white
      cv::Mat color, alpha;
      std::vector<cv::Mat> ch;
      cv::split(img, ch);
      cv::merge(std::vector<cv::Mat>{ch[0], ch[1], ch[2]}, color);
      ch[3].convertTo(alpha, CV_32F, 1.0 / 255.0);
      cv::Mat alpha3;
      cv::merge(std::vector<cv::Mat>{alpha, alpha, alpha}, alpha3);
      cv::Mat color_f;
      color.convertTo(color_f, CV_32FC3);
      cv::Mat out = color_f.mul(alpha3) + (cv::Scalar::all(1.0) - alpha3) * 255.0;
      out.convertTo(color, CV_8UC3);
      if (bgr_order) cv::cvtColor(color, rgb, cv::COLOR_BGR2RGB);
      else rgb = color;
      break;
    }
    default: TORCH_CHECK_VALUE(false, "unsupported image with ", img.channels(), " channels");
  }
  return rgb;
}

/// EXIF orientation (1-8) from a JPEG's APP1 segment; 1 when absent, 0 when
/// the segment is there but cannot be read.
int jpeg_exif_orientation(const std::string& b) {
  size_t i = 2;
  const size_t n = b.size();
  while (i + 4 <= n && uint8_t(b[i]) == 0xFF) {
    const uint8_t marker = uint8_t(b[i + 1]);
    if (marker == 0xDA || marker == 0xD9) break;  // start of scan: no more metadata
    const size_t length = be16(b, i + 2);
    if (length < 2 || i + 2 + length > n) return 0;
    if (marker == 0xE1 && length >= 8 && b.compare(i + 4, 6, std::string("Exif\0\0", 6)) == 0) {
      const size_t t = i + 10, end = i + 2 + length;  // TIFF header
      if (t + 8 > end) return 0;
      const bool le = b[t] == 'I';
      auto u16 = [&](size_t k) { return le ? le16(b, k) : be16(b, k); };
      auto u32 = [&](size_t k) { return le ? (le16(b, k) | (le16(b, k + 2) << 16)) : be32(b, k); };
      const size_t ifd = t + u32(t + 4);
      if (ifd + 2 > end || ifd < t) return 0;
      const size_t count = u16(ifd);
      for (size_t e = 0; e < count && ifd + 2 + 12 * (e + 1) <= end; ++e) {
        const size_t entry = ifd + 2 + 12 * e;
        if (u16(entry) == 0x0112) {
          const int value = int(u16(entry + 8));
          return value >= 1 && value <= 8 ? value : 0;
        }
      }
      return 1;
    }
    i += 2 + length;
  }
  return 1;
}

struct JpegErrorManager {
  jpeg_error_mgr base;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

[[noreturn]] void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void jpeg_silent(j_common_ptr, int) {}  // warnings (e.g. extraneous bytes) are not errors, as in PIL

enum class JpegResult { ok, unsupported, too_large, error };

/// Decodes baseline/progressive YCbCr or grayscale JPEG straight to RGB with
/// libjpeg, scaled by 1/denom (DCT scaling). Faster than cv::imdecode for
/// the same pixels (no BGR round trip, no extra copies; docs/benchmarks.md).
/// Other colour spaces (CMYK, YCCK) report `unsupported`; errors fill
/// `message`. No C++ object with a destructor lives across setjmp.
JpegResult decode_jpeg_direct(const std::string& bytes, int denom, int64_t max_pixels, cv::Mat* out,
                              int64_t* width, int64_t* height, char* message) {
  jpeg_decompress_struct cinfo;
  JpegErrorManager err;
  cinfo.err = jpeg_std_error(&err.base);
  err.base.error_exit = jpeg_error_exit;
  err.base.emit_message = jpeg_silent;
  if (setjmp(err.jump)) {
    std::snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::error;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  *width = cinfo.image_width;
  *height = cinfo.image_height;
  if (*height > 0 && *width > max_pixels / *height) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::too_large;
  }
  if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
      cinfo.jpeg_color_space != JCS_RGB) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::unsupported;
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = static_cast<unsigned int>(denom);
  jpeg_start_decompress(&cinfo);
  out->create(int(cinfo.output_height), int(cinfo.output_width), CV_8UC3);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out->ptr(int(cinfo.output_scanline));
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return JpegResult::ok;
}

const char* kBase64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}  // namespace

std::array<int64_t, 2> peek_image_size(const std::string& b) {
  const size_t n = b.size();
  if (n >= 24 && b.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0) return {be32(b, 16), be32(b, 20)};
  if (n >= 10 && (b.compare(0, 6, "GIF87a") == 0 || b.compare(0, 6, "GIF89a") == 0)) return {le16(b, 6), le16(b, 8)};
  if (n >= 26 && b[0] == 'B' && b[1] == 'M') {
    // BITMAPCOREHEADER (OS/2, 12 bytes) has 16-bit sizes; the others 32-bit.
    if (le16(b, 14) == 12 && le16(b, 16) == 0) return {le16(b, 18), le16(b, 20)};
    const int32_t w = int32_t(le16(b, 18) | (le16(b, 20) << 16));
    const int32_t h = int32_t(le16(b, 22) | (le16(b, 24) << 16));
    return {std::abs(int64_t(w)), std::abs(int64_t(h))};
  }
  if (n >= 30 && b.compare(0, 4, "RIFF") == 0 && b.compare(8, 4, "WEBP") == 0) {
    if (b.compare(12, 4, "VP8X") == 0) return {1 + le24(b, 24), 1 + le24(b, 27)};
    if (b.compare(12, 4, "VP8 ") == 0) return {le16(b, 26) & 0x3FFF, le16(b, 28) & 0x3FFF};
    if (b.compare(12, 4, "VP8L") == 0) {
      const uint32_t bits = uint32_t(uint8_t(b[21])) | (uint32_t(uint8_t(b[22])) << 8) |
                            (uint32_t(uint8_t(b[23])) << 16) | (uint32_t(uint8_t(b[24])) << 24);
      return {1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)};
    }
  }
  if (is_jpeg(b)) {
    size_t i = 2;
    while (i + 9 < n) {
      if (uint8_t(b[i]) != 0xFF) return {0, 0};
      const uint8_t marker = uint8_t(b[i + 1]);
      if (marker == 0xFF) { ++i; continue; }
      const bool sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
      if (sof) return {be16(b, i + 7), be16(b, i + 5)};
      if (marker == 0xD8 || (marker >= 0xD0 && marker <= 0xD7)) { i += 2; continue; }
      i += 2 + be16(b, i + 2);
    }
  }
  return {0, 0};
}

namespace {
/// A decoder that returns another size than the header declares read a
/// different image than the file says it holds: refuse it. The declared size
/// is divided (rounding up) by the JPEG draft scale; EXIF-rotated JPEGs may
/// come out transposed.
cv::Mat checked_size(cv::Mat image, const std::array<int64_t, 2>& declared, int denom, bool may_transpose) {
  if (declared[0] <= 0 || declared[1] <= 0) return image;
  const int64_t w = (declared[0] + denom - 1) / denom, h = (declared[1] + denom - 1) / denom;
  const bool same = image.cols == w && image.rows == h;
  const bool transposed = may_transpose && image.cols == h && image.rows == w;
  TORCH_CHECK_VALUE(same || transposed, "decode_image: the header declares ", declared[0], "x", declared[1],
                    denom > 1 ? " (" + std::to_string(w) + "x" + std::to_string(h) + " at 1/" + std::to_string(denom) + ")" : "",
                    " but the decoder produced ", image.cols, "x", image.rows, " (corrupt or inconsistent file)");
  return image;
}
}  // namespace

cv::Mat decode_image(const std::string& bytes, int64_t max_pixels, int64_t min_side) {
  TORCH_CHECK_VALUE(!bytes.empty(), "decode_image: expected image bytes, got 0 bytes");
  TORCH_CHECK_VALUE(max_pixels > 0, "decode_image: max_pixels must be positive, got ", max_pixels);
  TORCH_CHECK_VALUE(is_supported_format(bytes), "decode_image: could not decode ", bytes.size(),
                    " bytes starting with [", hex_prefix(bytes), "]: not a JPEG/PNG/BMP/TIFF/WebP image");
  const auto size = peek_image_size(bytes);
  if (size[0] > 0 && size[1] > 0) check_pixels(size[0], size[1], max_pixels);
  if (is_jpeg(bytes)) {
    // libjpeg decodes a truncated file with a warning and grey rows; refuse it.
    TORCH_CHECK_VALUE(bytes.find("\xFF\xD9", bytes.size() > 4096 ? bytes.size() - 4096 : 2) != std::string::npos,
                      "decode_image: truncated JPEG (", bytes.size(), " bytes, no end-of-image marker)");
  }
  int denom = 1;
  if (is_jpeg(bytes) && min_side > 0 && size[0] > 0) {
    const int64_t shortest = std::min(size[0], size[1]);
    denom = shortest >= 8 * min_side ? 8 : shortest >= 4 * min_side ? 4 : shortest >= 2 * min_side ? 2 : 1;
  }
  // EXIF-rotated and CMYK JPEGs take OpenCV's path, which handles both.
  if (is_jpeg(bytes) && jpeg_exif_orientation(bytes) == 1) {
    cv::Mat rgb;
    char message[JMSG_LENGTH_MAX] = {0};
    int64_t width = 0, height = 0;
    const auto result = decode_jpeg_direct(bytes, denom, max_pixels, &rgb, &width, &height, message);
    if (result == JpegResult::too_large) check_pixels(width, height, max_pixels);
    TORCH_CHECK_VALUE(result != JpegResult::error, "decode_image: could not decode JPEG of ", bytes.size(),
                      " bytes: ", message);
    if (result == JpegResult::ok) {
      check_pixels(rgb.cols, rgb.rows, max_pixels);
      return checked_size(rgb, size, denom, false);
    }
  }
  cv::Mat buffer(1, int(bytes.size()), CV_8U, const_cast<char*>(bytes.data()));
  int flags = is_jpeg(bytes) ? cv::IMREAD_COLOR : cv::IMREAD_UNCHANGED;
  if (denom == 8) flags = cv::IMREAD_REDUCED_COLOR_8;
  else if (denom == 4) flags = cv::IMREAD_REDUCED_COLOR_4;
  else if (denom == 2) flags = cv::IMREAD_REDUCED_COLOR_2;
  cv::Mat decoded;
  try {
    decoded = cv::imdecode(buffer, flags);
  } catch (const cv::Exception& e) {
    TORCH_CHECK_VALUE(false, "decode_image: OpenCV could not decode ", bytes.size(), " bytes: ", e.what());
  }
  TORCH_CHECK_VALUE(!decoded.empty(), "decode_image: could not decode ", bytes.size(),
                    " bytes starting with [", hex_prefix(bytes),
                    "]: not a JPEG/PNG/BMP/TIFF/WebP image, or truncated");
  check_pixels(decoded.cols, decoded.rows, max_pixels);
  return checked_size(to_rgb8(decoded, /*bgr_order=*/true), size, denom, is_jpeg(bytes));
}

cv::Mat load_image(const std::string& path, int64_t max_pixels, int64_t min_side) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw FileNotFoundError("image file not found or not readable: '" + path + "'");
  // One read of the whole file (an istreambuf_iterator copy goes byte by byte).
  std::string bytes;
  file.seekg(0, std::ios::end);
  const std::streamoff length = file.tellg();
  file.seekg(0, std::ios::beg);
  if (length > 0) {
    bytes.resize(size_t(length));
    file.read(bytes.data(), length);
    bytes.resize(size_t(file.gcount()));
  } else {  // not seekable (a pipe): read as a stream
    bytes.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  }
  try {
    return decode_image(bytes, max_pixels, min_side);
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "'", path, "': ", e.what_without_backtrace());
  }
}

std::string base64_decode(const std::string& text) {
  std::string out;
  out.reserve(text.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : text) {
    if (c == '=' ) break;
    if (c == '\n' || c == '\r' || c == ' ' || c == '\t') continue;
    const char* p = std::strchr(kBase64, c);
    TORCH_CHECK_VALUE(p && c != '\0', "base64: invalid character '", c, "'");
    acc = (acc << 6) | uint32_t(p - kBase64);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(char((acc >> bits) & 0xFF));
    }
  }
  return out;
}

cv::Mat decode_data_url(const std::string& url, int64_t max_pixels, int64_t min_side) {
  const auto comma = url.find(',');
  TORCH_CHECK_VALUE(url.compare(0, 5, "data:") == 0 && comma != std::string::npos &&
                        url.substr(0, comma).find(";base64") != std::string::npos,
                    "expected a data URL like 'data:image/jpeg;base64,...', got '", url.substr(0, 40),
                    url.size() > 40 ? "...'" : "'");
  return decode_image(base64_decode(url.substr(comma + 1)), max_pixels, min_side);
}

cv::Mat image_from_array(const uint8_t* data, int64_t height, int64_t width, int64_t channels) {
  TORCH_CHECK_VALUE(height > 0 && width > 0 && (channels == 1 || channels == 3 || channels == 4),
                    "expected an H x W x C uint8 image with C in {1, 3, 4}, got ", height, " x ", width,
                    " x ", channels);
  cv::Mat view(int(height), int(width), CV_8UC(int(channels)), const_cast<uint8_t*>(data));
  return to_rgb8(view.clone(), /*bgr_order=*/false);
}

cv::Mat image_from_tensor(const torch::Tensor& image) {
  TORCH_CHECK_VALUE(image.defined() && image.dim() == 3, "expected an image tensor [H, W, C] uint8 or [C, H, W] float, got ",
                    image.defined() ? image.sizes() : torch::IntArrayRef{});
  auto t = image.to(torch::kCPU);
  if (t.scalar_type() == torch::kUInt8) {
    t = t.contiguous();
    return image_from_array(t.data_ptr<uint8_t>(), t.size(0), t.size(1), t.size(2));
  }
  TORCH_CHECK_TYPE(torch::isFloatingType(t.scalar_type()), "expected a uint8 or floating image tensor, got ",
                   t.scalar_type());
  t = (t.clamp(0, 1) * 255).round().to(torch::kUInt8).permute({1, 2, 0}).contiguous();
  return image_from_array(t.data_ptr<uint8_t>(), t.size(0), t.size(1), t.size(2));
}

torch::Tensor image_to_tensor(const cv::Mat& rgb) {
  cv::Mat c = rgb.isContinuous() ? rgb : rgb.clone();
  return torch::from_blob(c.data, {c.rows, c.cols, c.channels()}, torch::kUInt8).clone();
}

// ---------------------------------------------------------------- resizing
namespace {
// PIL's resampling (Pillow's Resample.c, bilinear filter), reimplemented: a
// triangle filter whose support grows with the shrink factor (anti-aliased),
// 22-bit fixed-point weights, a horizontal pass then a vertical pass, each
// rounding to uint8. Same arithmetic, so the same bytes as PIL's
// Image.resize(size, BILINEAR) and hence torchvision's Resize on PIL images.
constexpr int kResampleBits = 22;

struct ResampleCoeffs {
  int ksize = 0;
  std::vector<int> bounds;   // per output pixel: first input index, tap count
  std::vector<int32_t> k;    // per output pixel: ksize fixed-point weights
};

ResampleCoeffs resample_coeffs(int in_size, int out_size) {
  const double scale = double(in_size) / out_size, filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;  // the bilinear filter's support is 1
  ResampleCoeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.k.assign(size_t(out_size) * size_t(c.ksize), 0);
  std::vector<double> w(size_t(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale, ss = 1.0 / filterscale;
    const int xmin = std::max(0, int(center - support + 0.5));
    const int n = std::min(in_size, int(center + support + 0.5)) - xmin;
    double total = 0.0;
    for (int x = 0; x < n; ++x) {
      const double t = std::fabs((x + xmin - center + 0.5) * ss);
      w[size_t(x)] = t < 1.0 ? 1.0 - t : 0.0;
      total += w[size_t(x)];
    }
    for (int x = 0; x < n; ++x) {
      const double v = total != 0.0 ? w[size_t(x)] / total : w[size_t(x)];
      c.k[size_t(xx) * size_t(c.ksize) + size_t(x)] =
          int32_t(v < 0 ? -0.5 + v * (1 << kResampleBits) : 0.5 + v * (1 << kResampleBits));
    }
    c.bounds[2 * size_t(xx)] = xmin;
    c.bounds[2 * size_t(xx) + 1] = n;
  }
  return c;
}

/// Vertical pass: out row yy = sum over taps of input rows (bounds - first),
/// whole rows at a time (vectorises; an AVX2 copy is picked at run time).
inline __attribute__((always_inline)) void resample_rows_body(const cv::Mat& in, int first,
                                                              const ResampleCoeffs& c, cv::Mat& out,
                                                              int32_t* __restrict acc) {
  const int row = in.cols * in.channels();
  for (int yy = 0; yy < out.rows; ++yy) {
    const int ymin = c.bounds[2 * size_t(yy)] - first, n = c.bounds[2 * size_t(yy) + 1];
    const int32_t* k = &c.k[size_t(yy) * size_t(c.ksize)];
    for (int i = 0; i < row; ++i) acc[i] = 1 << (kResampleBits - 1);
    for (int y = 0; y < n; ++y) {
      const uint8_t* __restrict src = in.ptr<uint8_t>(ymin + y);
      const int32_t w = k[y];
      for (int i = 0; i < row; ++i) acc[i] += int32_t(src[i]) * w;
    }
    uint8_t* __restrict dst = out.ptr<uint8_t>(yy);
    for (int i = 0; i < row; ++i) {
      const int32_t v = acc[i] >> kResampleBits;
      dst[i] = uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) void resample_rows_avx2(const cv::Mat& in, int first, const ResampleCoeffs& c,
                                                        cv::Mat& out, int32_t* acc) {
  resample_rows_body(in, first, c, out, acc);
}
#endif

void resample_rows(const cv::Mat& in, int first, const ResampleCoeffs& c, cv::Mat& out) {
  std::vector<int32_t> acc(size_t(in.cols) * size_t(in.channels()));
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return resample_rows_avx2(in, first, c, out, acc.data());
#endif
  resample_rows_body(in, first, c, out, acc.data());
}

cv::Mat resize_to(const cv::Mat& rgb, int64_t width, int64_t height) {
  TORCH_CHECK_VALUE(width > 0 && height > 0, "resize: target size must be positive, got ", width, "x", height);
  TORCH_CHECK_VALUE(width <= std::numeric_limits<int>::max() / 3 / height, "resize: target size ", width, "x",
                    height, " is too large (over 2^31 bytes)");
  const int out_w = int(width), out_h = int(height);
  if (out_w == rgb.cols && out_h == rgb.rows) return rgb.clone();
  const auto vertical = resample_coeffs(rgb.rows, out_h);
  // Input rows the vertical pass reads; the horizontal pass only needs those.
  const int first = vertical.bounds[0];
  const int last = vertical.bounds[2 * size_t(out_h) - 2] + vertical.bounds[2 * size_t(out_h) - 1];
  cv::Mat source = rgb;
  int offset = 0;
  if (out_w != rgb.cols) {
    // The horizontal pass runs as a vertical pass on the transposed rows.
    const auto horizontal = resample_coeffs(rgb.cols, out_w);
    cv::Mat transposed, shrunk(out_w, last - first, rgb.type()), back;
    cv::transpose(rgb.rowRange(first, last), transposed);
    resample_rows(transposed, 0, horizontal, shrunk);
    cv::transpose(shrunk, back);
    source = back;
    offset = first;
  }
  if (out_h == rgb.rows) return source;
  cv::Mat out(out_h, source.cols, rgb.type());
  resample_rows(source, offset, vertical, out);
  return out;
}

void check_rgb(const cv::Mat& rgb, const char* who) { detail::check_rgb_image(rgb, who); }
}  // namespace

cv::Mat resize_image(const cv::Mat& rgb, int64_t width, int64_t height) {
  check_rgb(rgb, "resize_image");
  return resize_to(rgb, width, height);
}

cv::Mat resize_square(const cv::Mat& rgb, int64_t size) {
  check_rgb(rgb, "resize_square");
  return resize_to(rgb, size, size);
}

cv::Mat letterbox(const cv::Mat& rgb, int64_t size, LetterboxInfo* info, int fill) {
  check_rgb(rgb, "letterbox");
  TORCH_CHECK_VALUE(size > 0, "letterbox: size must be positive, got ", size);
  const double scale = std::min(double(size) / rgb.cols, double(size) / rgb.rows);
  const int64_t w = std::max<int64_t>(1, std::llround(rgb.cols * scale));
  const int64_t h = std::max<int64_t>(1, std::llround(rgb.rows * scale));
  auto resized = resize_to(rgb, w, h);
  LetterboxInfo li;
  li.scale_x = double(w) / rgb.cols;
  li.scale_y = double(h) / rgb.rows;
  li.pad_x = (size - w) / 2;
  li.pad_y = (size - h) / 2;
  cv::Mat out;
  cv::copyMakeBorder(resized, out, int(li.pad_y), int(size - h - li.pad_y), int(li.pad_x), int(size - w - li.pad_x),
                     cv::BORDER_CONSTANT, cv::Scalar::all(fill));
  if (info) *info = li;
  return out;
}

std::vector<Box> letterbox_boxes(const std::vector<Box>& boxes, const LetterboxInfo& info) {
  std::vector<Box> out;
  for (const auto& b : boxes)
    out.push_back({b.x1 * info.scale_x + info.pad_x, b.y1 * info.scale_y + info.pad_y,
                   b.x2 * info.scale_x + info.pad_x, b.y2 * info.scale_y + info.pad_y});
  return out;
}

cv::Mat shortest_side_center_crop(const cv::Mat& rgb, int64_t size) {
  check_rgb(rgb, "shortest_side_center_crop");
  TORCH_CHECK_VALUE(size > 0, "shortest_side_center_crop: size must be positive, got ", size);
  const double scale = double(size) / std::min(rgb.cols, rgb.rows);
  const int64_t w = std::max<int64_t>(size, std::llround(rgb.cols * scale));
  const int64_t h = std::max<int64_t>(size, std::llround(rgb.rows * scale));
  auto resized = resize_to(rgb, w, h);
  return resized(cv::Rect(int((w - size) / 2), int((h - size) / 2), int(size), int(size))).clone();
}

std::array<int64_t, 2> dynamic_resolution(int64_t height, int64_t width, int64_t patch, int64_t merge,
                                          int64_t min_pixels, int64_t max_pixels) {
  TORCH_CHECK_VALUE(height > 0 && width > 0 && patch > 0 && merge > 0,
                    "dynamic_resolution: sizes must be positive");
  TORCH_CHECK_VALUE(min_pixels > 0 && min_pixels <= max_pixels,
                    "dynamic_resolution: need 0 < min_pixels <= max_pixels, got ", min_pixels, " and ", max_pixels);
  TORCH_CHECK_VALUE(std::max(height, width) <= 200 * std::min(height, width),
                    "dynamic_resolution: aspect ratio over 200 (", width, "x", height, ")");
  const double factor = double(patch * merge);
  auto round_to = [&](double v) { return std::max(factor, std::round(v / factor) * factor); };
  double h = round_to(height), w = round_to(width);
  if (h * w > max_pixels) {
    const double beta = std::sqrt(double(height) * width / max_pixels);
    h = std::max(factor, std::floor(height / beta / factor) * factor);
    w = std::max(factor, std::floor(width / beta / factor) * factor);
  } else if (h * w < min_pixels) {
    const double beta = std::sqrt(double(min_pixels) / (double(height) * width));
    h = std::ceil(height * beta / factor) * factor;
    w = std::ceil(width * beta / factor) * factor;
  }
  return {int64_t(h), int64_t(w)};
}

std::vector<cv::Mat> tile_image(const cv::Mat& rgb, int64_t tile, int64_t max_tiles, bool global_view,
                                std::array<int64_t, 2>* grid) {
  check_rgb(rgb, "tile_image");
  TORCH_CHECK_VALUE(tile > 0 && max_tiles >= 1, "tile_image: tile and max_tiles must be positive");
  const double aspect = std::log(double(rgb.cols) / rgb.rows);
  int64_t best_r = 1, best_c = 1;
  double best = 1e9;
  for (int64_t r = 1; r <= max_tiles; ++r)
    for (int64_t c = 1; r * c <= max_tiles; ++c) {
      const double err = std::abs(std::log(double(c) / r) - aspect);
      // Prefer the closer aspect; on ties, more tiles (more detail).
      if (err < best - 1e-9 || (std::abs(err - best) < 1e-9 && r * c > best_r * best_c)) {
        best = err, best_r = r, best_c = c;
      }
    }
  std::vector<cv::Mat> out;
  if (global_view) out.push_back(resize_to(rgb, tile, tile));
  auto resized = resize_to(rgb, best_c * tile, best_r * tile);
  for (int64_t r = 0; r < best_r; ++r)
    for (int64_t c = 0; c < best_c; ++c)
      out.push_back(resized(cv::Rect(int(c * tile), int(r * tile), int(tile), int(tile))).clone());
  if (grid) *grid = {best_r, best_c};
  return out;
}

// ---------------------------------------------------------------- tensors
Normalization Normalization::preset(const std::string& name) {
  if (name == "clip") return {{0.48145466, 0.4578275, 0.40821073}, {0.26862954, 0.26130258, 0.27577711}};
  if (name == "siglip") return {{0.5, 0.5, 0.5}, {0.5, 0.5, 0.5}};
  if (name == "imagenet") return {{0.485, 0.456, 0.406}, {0.229, 0.224, 0.225}};
  if (name == "none") return {};
  TORCH_CHECK_VALUE(false, "unknown normalisation preset '", name, "'; expected one of 'clip', 'siglip', 'imagenet', 'none'");
}

void write_chw(const cv::Mat& rgb, const Normalization& norm, const torch::Tensor& out) {
  check_rgb(rgb, "to_chw_tensor");
  for (double s : norm.std) TORCH_CHECK_VALUE(s > 0, "normalisation std must be positive, got ", s);
  TORCH_CHECK_VALUE(out.scalar_type() == torch::kFloat && out.device().is_cpu() && out.dim() == 3 &&
                        out.size(0) == 3 && out.size(1) >= rgb.rows && out.size(2) >= rgb.cols && out.stride(2) == 1,
                    "write_chw: expected a float32 CPU tensor [3, >= ", rgb.rows, ", >= ", rgb.cols,
                    "] with contiguous rows, got ", out.sizes());
  // One pass over the interleaved pixels through a table per channel (a byte has
  // 256 normalised values), writing the three planes together. It replaced a
  // channel extraction and a convertTo per channel: three passes over the image
  // (the loader's profile: write_chw was ~40% of a worker's time; docs/benchmarks.md).
  float table[3][256];
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) table[c][v] = float((v / 255.0 - norm.mean[c]) / norm.std[c]);
  float* base = out.data_ptr<float>();
  const int64_t plane = out.stride(0), row = out.stride(1);
  for (int y = 0; y < rgb.rows; ++y) {
    const uint8_t* p = rgb.ptr<uint8_t>(y);
    float* r = base + y * row;
    float* g = r + plane;
    float* b = g + plane;
    for (int x = 0; x < rgb.cols; ++x, p += 3) {
      r[x] = table[0][p[0]];
      g[x] = table[1][p[1]];
      b[x] = table[2][p[2]];
    }
  }
}

torch::Tensor to_chw_tensor(const cv::Mat& rgb, const Normalization& norm) {
  check_rgb(rgb, "to_chw_tensor");
  auto out = torch::empty({3, rgb.rows, rgb.cols}, torch::kFloat);
  write_chw(rgb, norm, out);
  return out;
}

ImageBatch collate_images(const std::vector<torch::Tensor>& images, int64_t multiple) {
  TORCH_CHECK_VALUE(!images.empty(), "collate_images: expected at least one image");
  TORCH_CHECK_VALUE(multiple >= 1, "collate_images: multiple must be >= 1, got ", multiple);
  int64_t height = 0, width = 0;
  const auto& first = images.front();
  for (size_t i = 0; i < images.size(); ++i) {
    const auto& t = images[i];
    TORCH_CHECK_VALUE(t.defined() && t.dim() == 3 && t.size(0) == first.size(0) && t.size(1) > 0 && t.size(2) > 0,
                      "collate_images: expected [C, H, W] images with C = ", first.defined() ? first.size(0) : 0,
                      ", got image ", i, " of shape ", t.defined() ? t.sizes() : torch::IntArrayRef{});
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type() && t.device() == first.device(),
                     "collate_images: image ", i, " is ", t.scalar_type(), " on ", t.device(), ", image 0 is ",
                     first.scalar_type(), " on ", first.device());
    height = std::max(height, t.size(1));
    width = std::max(width, t.size(2));
  }
  height = (height + multiple - 1) / multiple * multiple;
  width = (width + multiple - 1) / multiple * multiple;
  ImageBatch out;
  const auto b = int64_t(images.size());
  out.images = torch::zeros({b, first.size(0), height, width}, first.options());
  out.image_sizes = torch::empty({b, 2}, torch::kLong);
  for (int64_t i = 0; i < b; ++i) {
    const auto& t = images[size_t(i)];
    out.images[i].slice(1, 0, t.size(1)).slice(2, 0, t.size(2)).copy_(t);
    out.image_sizes[i][0] = t.size(1);
    out.image_sizes[i][1] = t.size(2);
  }
  return out;
}

// ---------------------------------------------------------------- augmentation
cv::Mat horizontal_flip(const cv::Mat& rgb, std::vector<Box>* boxes, std::vector<Polygon>* polygons) {
  check_rgb(rgb, "horizontal_flip");
  cv::Mat out;
  cv::flip(rgb, out, 1);
  if (boxes)
    for (auto& b : *boxes) {
      const double x1 = rgb.cols - b.x2, x2 = rgb.cols - b.x1;
      b.x1 = x1;
      b.x2 = x2;
    }
  if (polygons) *polygons = flip_polygons(*polygons, rgb.cols);
  return out;
}

cv::Mat random_resized_crop(const cv::Mat& rgb, int64_t size, std::mt19937_64& rng, std::array<double, 2> scale,
                            std::array<double, 2> ratio, std::vector<Box>* boxes, std::vector<Polygon>* polygons) {
  check_rgb(rgb, "random_resized_crop");
  TORCH_CHECK_VALUE(!boxes || !polygons || boxes->size() == polygons->size(), "random_resized_crop: ",
                    boxes ? boxes->size() : 0, " boxes but ", polygons ? polygons->size() : 0,
                    " polygons; given both, they are one list of objects");
  TORCH_CHECK_VALUE(scale[0] > 0 && scale[0] <= scale[1] && scale[1] <= 1 && ratio[0] > 0 && ratio[0] <= ratio[1],
                    "random_resized_crop: need 0 < scale_min <= scale_max <= 1 and 0 < ratio_min <= ratio_max");
  const double area = double(rgb.cols) * rgb.rows;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  int x = 0, y = 0, w = rgb.cols, h = rgb.rows;
  bool found = false;
  for (int attempt = 0; attempt < 10 && !found; ++attempt) {
    const double target = area * (scale[0] + (scale[1] - scale[0]) * u(rng));
    const double log_ratio = std::log(ratio[0]) + (std::log(ratio[1]) - std::log(ratio[0])) * u(rng);
    const double ar = std::exp(log_ratio);
    const int cw = int(std::lround(std::sqrt(target * ar))), ch = int(std::lround(std::sqrt(target / ar)));
    if (cw > 0 && ch > 0 && cw <= rgb.cols && ch <= rgb.rows) {
      x = int(std::floor(u(rng) * (rgb.cols - cw + 1)));
      y = int(std::floor(u(rng) * (rgb.rows - ch + 1)));
      w = cw, h = ch, found = true;
    }
  }
  if (!found) {  // central crop at the clamped aspect ratio
    const double in_ratio = double(rgb.cols) / rgb.rows;
    if (in_ratio < ratio[0]) w = rgb.cols, h = int(std::lround(w / ratio[0]));
    else if (in_ratio > ratio[1]) h = rgb.rows, w = int(std::lround(h * ratio[1]));
    x = (rgb.cols - w) / 2, y = (rgb.rows - h) / 2;
  }
  auto out = resize_to(rgb(cv::Rect(x, y, w, h)), size, size);
  const double sx = double(size) / w, sy = double(size) / h;
  std::vector<Box> moved;
  std::vector<bool> keep;
  if (boxes)
    for (const auto& b : *boxes) {
      Box c{std::clamp(b.x1 - x, 0.0, double(w)), std::clamp(b.y1 - y, 0.0, double(h)),
            std::clamp(b.x2 - x, 0.0, double(w)), std::clamp(b.y2 - y, 0.0, double(h))};
      keep.push_back(c.x2 - c.x1 > 0 && c.y2 - c.y1 > 0);
      moved.push_back({c.x1 * sx, c.y1 * sy, c.x2 * sx, c.y2 * sy});
    }
  std::vector<Polygon> clipped;
  if (polygons) {
    clipped = crop_polygons(*polygons, x, y, w, h, sx, sy);
    keep.resize(clipped.size(), true);
    for (size_t i = 0; i < clipped.size(); ++i) keep[i] = keep[i] && !clipped[i].empty();
  }
  if (boxes) {
    boxes->clear();
    for (size_t i = 0; i < moved.size(); ++i)
      if (keep[i]) boxes->push_back(moved[i]);
  }
  if (polygons) {
    polygons->clear();
    for (size_t i = 0; i < clipped.size(); ++i)
      if (keep[i]) polygons->push_back(std::move(clipped[i]));
  }
  return out;
}

cv::Mat color_jitter(const cv::Mat& rgb, std::mt19937_64& rng, double brightness, double contrast,
                     double saturation) {
  check_rgb(rgb, "color_jitter");
  std::uniform_real_distribution<double> u(0.0, 1.0);
  auto factor = [&](double x) { return 1.0 - x + 2.0 * x * u(rng); };
  cv::Mat f;
  rgb.convertTo(f, CV_32FC3);
  f *= factor(brightness);
  cv::Mat gray;
  cv::cvtColor(f, gray, cv::COLOR_RGB2GRAY);
  const double mean = cv::mean(gray)[0];
  f = (f - cv::Scalar::all(mean)) * factor(contrast) + cv::Scalar::all(mean);
  cv::cvtColor(f, gray, cv::COLOR_RGB2GRAY);
  cv::Mat gray3;
  cv::cvtColor(gray, gray3, cv::COLOR_GRAY2RGB);
  f = gray3 + (f - gray3) * factor(saturation);
  cv::Mat out;
  f.convertTo(out, CV_8UC3);  // saturating
  return out;
}

// ---------------------------------------------------------------- drawing
cv::Mat draw_boxes(const cv::Mat& rgb, const std::vector<Box>& boxes, const std::vector<std::string>& labels) {
  check_rgb(rgb, "draw_boxes");
  TORCH_CHECK_VALUE(labels.empty() || labels.size() == boxes.size(), "draw_boxes: expected ", boxes.size(),
                    " labels (one per box) or none, got ", labels.size());
  cv::Mat out = rgb.clone();
  const int thickness = std::max(1, std::min(out.cols, out.rows) / 200);
  for (size_t i = 0; i < boxes.size(); ++i) {
    const auto& b = boxes[i];
    const auto color = detail::palette_colour(i);
    cv::rectangle(out, cv::Point(int(b.x1), int(b.y1)), cv::Point(int(b.x2), int(b.y2)), color, thickness);
    if (!labels.empty() && !labels[i].empty()) detail::draw_label(out, labels[i], int(b.x1), int(b.y1), color);
  }
  return out;
}

void save_png(const cv::Mat& rgb, const std::string& path) {
  check_rgb(rgb, "save_png");
  cv::Mat bgr;
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  bool ok = false;
  try {
    ok = cv::imwrite(path, bgr);
  } catch (const cv::Exception& e) {
    TORCH_CHECK_VALUE(false, "save_png: cannot write '", path, "': ", e.what());
  }
  TORCH_CHECK_VALUE(ok, "save_png: cannot write '", path, "' (does the folder exist? is the name a .png?)");
}

cv::Mat save_grid(const std::vector<cv::Mat>& images, const std::vector<std::string>& texts,
                  const std::string& path, int64_t columns) {
  TORCH_CHECK_VALUE(!images.empty(), "save_grid: expected at least one image");
  TORCH_CHECK_VALUE(texts.empty() || texts.size() == images.size(), "save_grid: expected ", images.size(),
                    " texts (one per image) or none, got ", texts.size());
  TORCH_CHECK_VALUE(columns >= 1, "save_grid: columns must be >= 1, got ", columns);
  const int w = std::max(images[0].cols, 128), h = std::max(images[0].rows, 128);
  const int strip = texts.empty() ? 0 : 34;
  const int cols = int(std::min<int64_t>(columns, int64_t(images.size())));
  const int rows = int((images.size() + cols - 1) / cols);
  cv::Mat grid(rows * (h + strip), cols * w, CV_8UC3, cv::Scalar(255, 255, 255));
  for (size_t i = 0; i < images.size(); ++i) {
    check_rgb(images[i], "save_grid");
    const int x = int(i % cols) * w, y = int(i / cols) * (h + strip);
    resize_to(images[i], w, h).copyTo(grid(cv::Rect(x, y, w, h)));
    if (!texts.empty()) {  // up to two lines of ~w/7 characters
      const size_t per_line = size_t(std::max(8, w / 7));
      for (size_t line = 0; line < 2 && line * per_line < texts[i].size(); ++line)
        cv::putText(grid, texts[i].substr(line * per_line, per_line), cv::Point(x + 2, y + h + 14 + int(line) * 15),
                    cv::FONT_HERSHEY_PLAIN, 0.9, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    }
  }
  save_png(grid, path);
  return grid;
}

}  // namespace vlmkit
