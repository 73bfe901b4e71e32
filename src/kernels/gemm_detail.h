#pragma once
// Float32 GEMMs for the hand-written kernels (defined in kernels/gemm.cpp).
#include <ATen/core/Tensor.h>

namespace vlmkit {
namespace kernels {

// x [..., k] as a [rows, k] matrix (a view where x's layout allows), also for k = 0.
inline at::Tensor as_matrix(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return x.reshape({rows, x.size(-1)});
}

// op(a) op(b) (+ bias over the rows) for 2-D matrices, of dtype `out` (a's
// dtype when Undefined; float32 or a's): float32 or bfloat16 on CPU through
// oneDNN's dnnl_sgemm / dnnl_gemm_bf16bf16f32 (float32 accumulation, the bias
// added in float32 before one rounding to `out`) where vlmkit was built with it,
// on compute_threads() threads; else ATen's GEMM (at::mm / at::addmm).
at::Tensor gemm(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, const at::Tensor& bias = {},
                at::ScalarType out = at::ScalarType::Undefined);

}  // namespace kernels
}  // namespace vlmkit
