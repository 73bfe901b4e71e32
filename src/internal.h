#pragma once
// Helpers shared by the compiled translation units (not installed).
#include <torch/types.h>

#include <ostream>
#include <string>

#include "vlmkit/config.h"

namespace vlmkit::detail {
/// "[2, 64, 64]", or "undefined".
std::string shape_str(const torch::Tensor& t);
/// "vlmkit::ViT(image_size=64, patch_size=8, ...)" from an options JSON ("type" left out).
void print_options(std::ostream& stream, const char* name, const json& fields);
}  // namespace vlmkit::detail
