#pragma once
/// Fused RMSNorm for CPU (and GroupNorm + GELU, below): y = x / sqrt(mean(x^2) + eps) * weight over the last
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

/// Which RMSNorm Norm runs on CPU, and which GroupNorm + GELU the conv stage
/// runs: "auto" (default) the fused kernels; "aten" the reference written with
/// ATen ops. Process-wide, like set_mlp_kernel; the
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

/// gelu(group_norm(x, groups, weight, bias, eps)) (exact, erf GELU) in one
/// kernel, differentiable in x, weight and bias (first derivatives): what the
/// conv stage (modules/conv_stage.h) runs after each convolution. x [N, C, ...]
/// of float32, float64 or bfloat16 on CPU with C divisible by groups; weight
/// and bias [C] of x's dtype or float32, or undefined (1 and 0). The result has
/// x's dtype: under bf16 autocast the convolution's bf16 output is normalised
/// in float32 and written back in bf16 for the next convolution, where ATen's
/// ops (GroupNorm in float32, GELU, and autocast's cast) make three passes and
/// two copies, and ATen's GELU backward falls to a scalar loop when the incoming
/// gradient's layout differs from its input's (1 M floats: 6.6 against 0.9 ms).
/// The kernel works channels last, one sample per unit of work: x is read as a
/// contiguous [N, ..., C] (no copy for a 4-D x stored channels last, the conv
/// stage's layout; one copy otherwise), and the result is that layout's view
/// [N, C, ...] (channels last for 4-D).
/// Statistics in float32 (float64 for float64); the backward keeps x and two
/// floats per (sample, group) and recomputes the rest. Results do not depend on
/// the number of threads.
at::Tensor group_norm_gelu(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                           const at::Tensor& bias, double eps = 1e-5);

}  // namespace kernels
}  // namespace vlmkit
