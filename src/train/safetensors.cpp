// safetensors files and SHA-256 (train/checkpoint.h).
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include "../internal.h"
#include "files.h"
#include "vlmkit/models/build.h"
#include "vlmkit/runtime.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/lora.h"
#include "vlmkit/train/trainer.h"

namespace fs = std::filesystem;

namespace vlmkit {
namespace {
struct DtypeName {
  torch::Dtype dtype;
  const char* name;
};
constexpr DtypeName kDtypes[] = {{torch::kFloat64, "F64"}, {torch::kFloat32, "F32"}, {torch::kFloat16, "F16"},
                                 {torch::kBFloat16, "BF16"}, {torch::kInt64, "I64"}, {torch::kInt32, "I32"},
                                 {torch::kInt16, "I16"},     {torch::kInt8, "I8"},    {torch::kUInt8, "U8"},
                                 {torch::kBool, "BOOL"}};

const char* dtype_name(torch::Dtype dtype) {
  for (const auto& d : kDtypes)
    if (d.dtype == dtype) return d.name;
  TORCH_CHECK_TYPE(false, "safetensors: cannot store dtype ", dtype);
}

constexpr uint64_t kMaxHeader = 100ull << 20;

using detail::join_list;
}  // namespace

using detail::read_file;
using detail::write_synced;


std::string serialize_safetensors(const TensorMap& tensors, const StringMap& metadata) {
  json header = json::object();
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK_VALUE(tensor.defined(), "safetensors: tensor '", name, "' is undefined");
    TORCH_CHECK_VALUE(name != "__metadata__", "safetensors: '__metadata__' is reserved");
    auto t = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = uint64_t(t.numel()) * uint64_t(t.element_size());
    header[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(t);
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((n >> (8 * i)) & 0xff);  // little-endian
  out += text;
  out.reserve(out.size() + offset);
  for (const auto& t : data) out.append(static_cast<const char*>(t.data_ptr()), size_t(t.numel() * t.element_size()));
  return out;
}

void save_safetensors(const std::string& path, const TensorMap& tensors, const StringMap& metadata) {
  write_synced(path, serialize_safetensors(tensors, metadata));
}

std::pair<TensorMap, StringMap> parse_safetensors(const std::string& bytes, const std::string& what) {
  TORCH_CHECK_VALUE(bytes.size() >= 8, what, ": not a safetensors file (", bytes.size(),
                    " bytes; expected an 8-byte header length first)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  TORCH_CHECK_VALUE(n <= kMaxHeader && n <= bytes.size() - 8, what, ": header length ", n,
                    " does not fit the file of ", bytes.size(), " bytes (truncated or not safetensors)");
  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(n));
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, what, ": header is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK_VALUE(header.is_object(), what, ": header must be a JSON object, got ", detail::json_kind(header));
  const uint64_t data_size = bytes.size() - 8 - n;
  const char* data = bytes.data() + 8 + n;
  TensorMap tensors;
  StringMap metadata;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      TORCH_CHECK_VALUE(entry.is_object(), what, ": __metadata__ must be an object of strings");
      for (const auto& [k, v] : entry.items()) {
        TORCH_CHECK_VALUE(v.is_string(), what, ": __metadata__['", k, "'] must be a string, got ", detail::json_kind(v));
        metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string at = what + ": tensor '" + name + "'";
    TORCH_CHECK_VALUE(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                          entry.contains("data_offsets"),
                      at, ": expected an object with dtype, shape and data_offsets");
    const auto& dt = entry["dtype"];
    TORCH_CHECK_VALUE(dt.is_string(), at, ": dtype must be a string");
    const DtypeName* found = nullptr;
    for (const auto& d : kDtypes)
      if (dt.get<std::string>() == d.name) found = &d;
    TORCH_CHECK_VALUE(found, at, ": unsupported dtype '", dt.get<std::string>(),
                      "' (expected F64, F32, F16, BF16, I64, I32, I16, I8, U8 or BOOL)");
    const auto& shape = entry["shape"];
    TORCH_CHECK_VALUE(shape.is_array() && shape.size() <= 16, at, ": shape must be an array of at most 16 sizes");
    std::vector<int64_t> sizes;
    uint64_t numel = 1;
    for (const auto& s : shape) {
      TORCH_CHECK_VALUE(s.is_number_unsigned(), at, ": shape entries must be non-negative integers");
      const uint64_t v = s.get<uint64_t>();
      TORCH_CHECK_VALUE(v == 0 || numel <= data_size / v, at, ": shape ", shape.dump(), " is larger than the file");
      numel *= v;
      sizes.push_back(int64_t(v));
    }
    const auto& off = entry["data_offsets"];
    TORCH_CHECK_VALUE(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                      at, ": data_offsets must be two non-negative integers");
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    auto t = torch::empty(sizes, found->dtype);
    TORCH_CHECK_VALUE(begin <= end && end <= data_size && end - begin == numel * uint64_t(t.element_size()), at,
                      ": data_offsets [", begin, ", ", end, "] do not match shape ", shape.dump(), " and dtype ",
                      found->name, " within ", data_size, " data bytes");
    if (numel) std::memcpy(t.data_ptr(), data + begin, size_t(end - begin));
    tensors.emplace(name, std::move(t));
  }
  return {std::move(tensors), std::move(metadata)};
}

std::pair<TensorMap, StringMap> load_safetensors(const std::string& path) {
  return parse_safetensors(read_file(path), path);
}

std::string sha256_hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  TORCH_CHECK(ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) == 1 &&
                  EVP_DigestUpdate(ctx.get(), bytes.data(), bytes.size()) == 1 &&
                  EVP_DigestFinal_ex(ctx.get(), digest, &length) == 1,
              "sha256: OpenSSL digest failed");
  std::ostringstream out;
  for (unsigned int i = 0; i < length; ++i) out << std::hex << std::setw(2) << std::setfill('0') << int(digest[i]);
  return out.str();
}

}  // namespace vlmkit
