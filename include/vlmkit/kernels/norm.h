#pragma once
/// Fused RMSNorm for CPU: y = x / sqrt(mean(x^2) + eps) * weight over the last
/// dimension, forward and backward each one pass over the rows, on torch's
/// intra-op threads, with AVX-512 / AVX2 clones picked at run time. ATen has no
/// RMSNorm in LibTorch 1.13; written with its ops it is eight passes (a cast,
/// pow, mean, add, rsqrt, two multiplies and a cast back) forward and more
/// backward. QK-norm applies it to every query and key head of every attention
/// layer (measured: 1.15x the step time of the small VLM with the ATen ops).
///
/// The statistics accumulate in float32 (float64 for float64 inputs); the
/// backward keeps x and one float per row. Norm (modules/norm.h) calls it for
/// RMSNorm on CPU when `norm_kernel()` is "auto"; always on CUDA, and when
/// "aten", it runs the ATen ops.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

namespace vlmkit {

/// Which RMSNorm Norm runs on CPU: "auto" (default) the fused kernel; "aten"
/// the reference written with ATen ops. Process-wide, like set_mlp_kernel; the
/// results agree to rounding.
void set_norm_kernel(const std::string& kernel);
std::string norm_kernel();

namespace kernels {

/// RMSNorm of x [..., D] with weight [D], differentiable in both (first
/// derivatives). CPU tensors of float32, float64 or bfloat16; weight of x's
/// dtype or float32. The result has dtype `out_dtype` when given, else the
/// promotion of x's and weight's dtypes (what the ATen ops return).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    c10::optional<at::ScalarType> out_dtype = c10::nullopt);

}  // namespace kernels
}  // namespace vlmkit
