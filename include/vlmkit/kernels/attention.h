#pragma once
/// Fused CPU attention: softmax(q k^T * scale + bias) v computed one query row
/// and one tile of keys at a time with an online softmax (Dao et al. 2022,
/// FlashAttention; Milakov & Gimelshein 2018), so the [B, H, T, S] scores and
/// weights are never stored, and key tiles that the bias blocks for a whole
/// tile of queries are skipped: the causal upper triangle, and in packed rows
/// (sequence packing) the other examples of the row. Backward recomputes the
/// weights from the saved row statistics (FlashAttention-2's backward).
///
/// MultiheadAttention calls it on CPU when `attention_kernel()` allows and the
/// inputs qualify (`fused_attention_supported`); otherwise, and always on
/// CUDA, it runs the ATen reference (matmul, softmax, matmul).
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace vlmkit {

/// Which attention implementation MultiheadAttention runs on CPU:
///   "auto"  (default) the fused kernel where it measured faster than ATen
///           for forward + backward (benchmarks/attention.py): float32
///           inputs, >= 96 queries and keys, and a mask that blocks at least
///           half of the kernel's tiles (packed rows: several examples per
///           row). In bfloat16 ATen's oneDNN GEMMs are faster than the
///           kernel, and in float32 plain causal or unmasked attention gains
///           nothing, so those keep ATen (docs/benchmarks.md, "Fused
///           attention", has the measurements). The rule ignores grad
///           mode, so a no-grad forward (eval, or an activation-checkpointed
///           block's first pass) computes exactly what the training forward does;
///   "fused" the fused kernel whenever the inputs qualify;
///   "aten"  always the reference (matmul, softmax, matmul).
/// The same setting picks the rotary positions of q and k: the fused
/// `rotary` below unless "aten" (the ATen ops).
/// Process-wide, like torch.backends flags; the results agree to rounding.
void set_attention_kernel(const std::string& kernel);
std::string attention_kernel();

namespace kernels {

/// The "auto" rule (or the forced setting): whether MultiheadAttention should
/// call the fused kernel for q [B, H, T, Dh] against S keys under this bias.
bool use_fused_attention(const at::Tensor& q, int64_t s, const at::Tensor& bias);

/// Share of the kernel's (query tile, key tile) pairs that the bias
/// [B | 1, 1, T, S] blocks entirely, which the kernel skips (0 without bias).
double blocked_tile_fraction(const at::Tensor& bias);

/// Why fused_attention cannot take these inputs, or "" when it can: CPU
/// tensors of one dtype (float32, float64 or bfloat16), q [B, H, T, Dh],
/// k and v [B, H, S, Dh] with unit stride in Dh, bias undefined or
/// [B | 1, 1, T, S] of a floating dtype that needs no gradient.
std::string fused_attention_unsupported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& bias);

/// softmax(q k^T * scale + bias) v, differentiable in q, k and v (first
/// derivatives; a double backward raises). Bias entries <= -1e30 block
/// (detail::attention_bias fills the dtype's lowest value); a query row whose
/// every key is blocked gets uniform weights, as the reference does.
/// bfloat16 inputs are computed in float32. Returns [B, H, T, Dh] (a view of
/// a [B, T, H, Dh] tensor, so merging the heads afterwards copies nothing).
at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                           double scale);

/// x [B, H, T, Dh] rotated pairwise by the rotary table (RoPE, the halves
/// convention): y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin over the two halves of
/// Dh, with cos and sin [B, T, Dh/2] (or [B, 1, T, Dh/2]) contiguous, in float32
/// (float64 for float64 x). One pass forward, one backward (the rotation back),
/// in float32 with one rounding for bfloat16 x, where the ATen ops (two slices,
/// four products, a subtraction, an addition and a cat, each rounding to bf16)
/// make eight passes. Reads x through its strides (the heads' transposed view);
/// the result has x's layout. Differentiable in x (first derivatives).
/// MultiheadAttention's self-attention calls it for q and k on CPU unless
/// attention_kernel() is "aten".
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// The pieces without autograd: forward returns (out, stats [2, B, H, T] (float32, float64 for float64 inputs)
/// of row max and log of the softmax denominator, skip map), backward returns
/// (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& bias,
                                                                       double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
    const at::Tensor& out, const at::Tensor& stats, const at::Tensor& skip, double scale);

}  // namespace kernels
}  // namespace vlmkit
