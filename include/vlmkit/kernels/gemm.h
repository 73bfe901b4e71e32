#pragma once
/// The float32 GEMMs of vlmkit's layers on CPU: every Linear (attention's
/// projections, MLPs, projectors, heads) and attention's two batched products.
///
/// Debian's LibTorch sends a float32 Linear or matmul to OpenBLAS, whose build on
/// this project's AVX-512 reference machine runs its AVX2 (Haswell) kernel; the
/// oneDNN that the same LibTorch loads runs AVX-512 and reaches 2.1-2.7x
/// OpenBLAS's rate on the small VLM's shapes (benchmarks/gemm_backends.py;
/// docs/benchmarks.md, "fp32 GEMMs: oneDNN against OpenBLAS"). These kernels call
/// oneDNN's dnnl_sgemm on plain row-major buffers: no layout conversion, the
/// bias fused into the product, attention's head views read in place.
///
/// Threads: oneDNN threads with OpenMP, and under the float32 policy torch
/// (hence OpenMP) has one thread while BLAS has the cores. Where OpenMP has
/// fewer threads than vlmkit's policy gives (compute_threads()), a product is
/// cut into blocks of rows or columns (a batch into its entries) that run as
/// single-threaded sgemms on run_parallel's pool, whose threads sleep between
/// calls; an OpenMP team of two would spin on the core OpenBLAS's second thread
/// needs (runtime.h).
///
/// Used where vlmkit was built against libdnnl (CMake finds the one LibTorch
/// loads), `gemm_kernel()` is "auto", the tensors are float32 on CPU and CPU
/// autocast is off; everywhere else (CUDA, bfloat16, autocast, float64) the
/// layers run at::linear and at::matmul.
#include <ATen/core/Tensor.h>

#include <string>

namespace vlmkit {

/// Which GEMMs vlmkit's Linear layers and attention run on CPU in float32:
///   "auto"  (default) oneDNN's sgemm where vlmkit was built with it;
///   "aten"  always at::linear and at::matmul (OpenBLAS on Debian's LibTorch).
/// Process-wide, like set_mlp_kernel; the results agree to rounding.
void set_gemm_kernel(const std::string& kernel);
std::string gemm_kernel();

namespace kernels {

/// True where vlmkit was built against oneDNN's C API (dnnl_sgemm).
bool have_dnnl_sgemm();

/// x w^T + b for x [..., in], w [out, in], b [out] or undefined, as at::linear,
/// differentiable in all three (first and second derivatives: a backward under
/// create_graph runs ATen's differentiable ops). Runs the oneDNN path where the
/// header's conditions hold, at::linear otherwise.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

/// a @ b for a [..., M, K] and b [..., K, N] with the same leading sizes (no
/// broadcasting), as at::matmul, differentiable (first and second derivatives):
/// attention's two batched products. One oneDNN sgemm per batch entry on the
/// pool's threads, strided views (heads split by view + transpose) read in place;
/// at::matmul wherever kernels::linear would run at::linear, and for other shapes.
at::Tensor matmul(const at::Tensor& a, const at::Tensor& b);

}  // namespace kernels
}  // namespace vlmkit
