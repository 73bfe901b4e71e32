#pragma once
/// The GEMMs of vlmkit's Linear layers on CPU in float32.
///
/// Debian's LibTorch sends a float32 Linear to OpenBLAS, whose build on this
/// project's AVX-512 reference machine runs its AVX2 (Haswell) kernel; the
/// oneDNN that the same LibTorch loads runs AVX-512 and reaches 2.1-2.7x
/// OpenBLAS's rate on the small VLM's shapes (benchmarks/gemm_backends.py;
/// docs/benchmarks.md, "fp32 GEMMs: oneDNN against OpenBLAS"). kernels::linear
/// runs y = x w^T + b and its backward (dx = dy w, dw = dy^T x, db = sum dy)
/// through oneDNN's dnnl_sgemm on plain row-major buffers: no layout
/// conversion, bias fused into the product.
///
/// The GEMMs take every thread vlmkit's thread policy gives either pool
/// (compute_threads()): torch's one thread and BLAS's cores in float32.
///
/// It is used where vlmkit was built against libdnnl (CMake finds it beside
/// LibTorch), `linear_kernel()` is "auto", the tensors are float32 on CPU and
/// CPU autocast is off; everywhere else (CUDA, bfloat16, autocast, float64)
/// vlmkit::Linear runs at::linear.
#include <ATen/core/Tensor.h>

#include <string>

namespace vlmkit {

/// Which GEMM vlmkit::Linear runs on CPU in float32:
///   "auto"  (default) oneDNN's sgemm where vlmkit was built with it;
///   "aten"  always at::linear (OpenBLAS on Debian's LibTorch).
/// Process-wide, like set_mlp_kernel; the results agree to rounding.
void set_linear_kernel(const std::string& kernel);
std::string linear_kernel();

namespace kernels {

/// True where vlmkit was built against oneDNN's C API (dnnl_sgemm).
bool have_dnnl_sgemm();

/// x w^T + b for x [..., in], w [out, in], b [out] or undefined, as at::linear,
/// differentiable in all three (first and second derivatives: a backward under
/// create_graph runs ATen's differentiable ops). Runs the oneDNN path where the
/// header's conditions hold, at::linear otherwise.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

}  // namespace kernels
}  // namespace vlmkit
