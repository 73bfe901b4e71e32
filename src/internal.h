#pragma once
// Helpers shared by the compiled translation units (not installed).
#include <torch/types.h>

#include <functional>
#include <map>
#include <ostream>
#include <vector>
#include <string>

#include "vlmkit/config.h"

namespace vlmkit {
struct EncoderOutput;
}

namespace vlmkit::detail {
/// Raises ValueError unless width and heads are positive and heads divides width.
void check_heads(int64_t dim, int64_t heads, const char* who);
/// out.pooled is [B, dim] (`which` names the input: "image", "text").
void check_pooled(const EncoderOutput& out, int64_t dim, const char* who, const char* which);
/// [B, L] int64: for each position, how many `counted` positions of the row
/// lie in earlier examples (segment_ids [B, L], -1 at padding).
torch::Tensor count_before_segment(const torch::Tensor& counted, const torch::Tensor& segment_ids);
/// out.tokens is [B, N, dim].
void check_tokens(const EncoderOutput& out, int64_t dim, const char* who, const char* which);
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
/// Runs fn(u) for every u in [0, units) on up to `threads` threads: on OpenMP's team
/// (at::parallel_for) where it already has that many (the bf16 policy: the team's
/// threads spin between regions, and run_parallel's worker would share a core with
/// one), else on run_parallel's pool (the fp32 policy: one OpenMP thread, and the pool
/// sleeps between calls where a second team would spin on BLAS's core); inline
/// inside a parallel region. Which thread runs a unit never changes its result.
/// Defined in kernels/gemm.cpp, compiled with OpenMP.
void parallel_units(int64_t units, int threads, const std::function<void(int64_t)>& fn);
}  // namespace vlmkit::detail
