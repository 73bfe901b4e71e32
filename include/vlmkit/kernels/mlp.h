#pragma once
/// Fused GELU MLP for CPU training: fc2(gelu(fc1(x))) whose backward keeps only
/// x and the pre-activation h = fc1(x), not gelu(h) (Korthikanti et al. 2022,
/// "selective activation recomputation"): backward recomputes gelu(h) in the
/// same pass that forms gelu'(h), so the block stores one [N, hidden] tensor
/// less and runs one elementwise pass less than ATen's gelu + gelu_backward.
/// GELU and its derivative come from one exp per element (vec_math.h), on
/// torch's intra-op threads.
///
/// TransformerBlock calls it on CPU for its "gelu" MLP when `mlp_kernel()`
/// allows and the block qualifies (no dropout while training, no LoRA adapter
/// on fc1 or fc2); otherwise, and always on CUDA, it runs ATen's Linear, gelu,
/// Linear. Under CPU autocast the GEMMs run in the autocast dtype, as ATen's
/// would, with float32 gradients for float32 weights. Its float32 GEMMs go
/// through oneDNN's dnnl_sgemm as vlmkit's Linear does (kernels/gemm.h).
#include <ATen/core/Tensor.h>

#include <string>

namespace vlmkit {

/// Which GELU MLP TransformerBlock runs on CPU:
///   "auto"  (default) the fused kernel wherever the block qualifies;
///   "aten"  always the reference (Linear, torch::gelu, Linear).
/// Process-wide, like set_attention_kernel; the results agree to rounding.
void set_mlp_kernel(const std::string& kernel);
std::string mlp_kernel();

namespace kernels {

/// fc2(gelu(fc1(x))) = gelu(x w1^T + b1) w2^T + b2 for x [..., in], w1 [hidden, in],
/// w2 [out, hidden] (biases may be undefined), differentiable in x, the weights
/// and the biases (first derivatives). CPU tensors of float32, float64 or
/// bfloat16 (x and weights of one dtype, or float32 weights under autocast).
/// Exact GELU (erf), as torch::gelu's default.
at::Tensor fused_gelu_mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2);

}  // namespace kernels
}  // namespace vlmkit
