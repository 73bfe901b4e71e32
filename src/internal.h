#pragma once
// Helpers shared by the compiled translation units (not installed).
#include <torch/types.h>

#include <map>
#include <ostream>
#include <vector>
#include <string>

#include "vlmkit/config.h"

namespace vlmkit::detail {
/// "[2, 64, 64]", or "undefined".
std::string shape_str(const torch::Tensor& t);
/// "vlmkit::ViT(image_size=64, patch_size=8, ...)" from an options JSON ("type" left out).
void print_options(std::ostream& stream, const char* name, const json& fields);
/// "a, b, c, ... (N in all)": at most `limit` items.
std::string join_list(const std::vector<std::string>& items, size_t limit = 8);
/// How `given` fails to fit `own` (same names, same shapes): "missing ...; unexpected ...;
/// shape mismatch ...; " naming the tensors ("" when it fits). `source` names the
/// given side in shape messages ("checkpoint", "adapter").
std::string state_mismatch(const std::map<std::string, torch::Tensor>& own,
                           const std::map<std::string, torch::Tensor>& given, const char* source);
}  // namespace vlmkit::detail
