// The vlmkit._C extension: version, threads, and the bound modules.
#include "common.h"

#include <torch/csrc/Dtype.h>

#include "vlmkit/kernels/attention.h"
#include "vlmkit/kernels/decode.h"
#include "vlmkit/kernels/gemm.h"
#include "vlmkit/kernels/mlp.h"
#include "vlmkit/kernels/norm.h"
#include "vlmkit/runtime.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlmkit: vision-language models on LibTorch (compiled core)";
  m.attr("__version__") = vlmkit::version();
  m.attr("torch_version") = vlmkit::torch_version();

  m.def("set_num_threads", &vlmkit::set_num_threads, py::arg("torch_threads"),
        py::arg("blas_threads") = 0,
        "Set torch intra-op threads and OpenBLAS threads (<= 0 leaves one unchanged).");
  auto info_to_dict = [](const vlmkit::ThreadInfo& info) {
    py::dict d;
    d["torch_threads"] = info.torch_threads;
    d["blas_threads"] = info.blas_threads;
    d["blas"] = info.blas;
    d["blas_config"] = info.blas_config;
    return d;
  };
  m.def("thread_info", [info_to_dict]() { return info_to_dict(vlmkit::thread_info()); },
        "Threads in force and which BLAS serves LibTorch.");
  m.def("apply_default_threads",
        [info_to_dict]() { return info_to_dict(vlmkit::apply_default_threads()); },
        "Apply vlmkit's thread policy: 1 torch thread, OpenBLAS on every core "
        "(VLMKIT_TORCH_THREADS / VLMKIT_BLAS_THREADS override).");

  m.def(
      "apply_default_allocator",
      []() {
        const auto info = vlmkit::apply_default_allocator();
        py::dict d;
        d["tuned"] = info.tuned;
        d["mmap_threshold"] = info.mmap_threshold;
        d["trim_threshold"] = info.trim_threshold;
        d["reason"] = info.reason;
        return d;
      },
      "Apply vlmkit's heap policy once (glibc: blocks below 32 MB from the heap, no trimming, so a training "
      "step does not page-fault its activations in afresh every step; VLMKIT_MALLOC=system skips it). "
      "Returns what is in force.");

  m.def("set_attention_kernel", &vlmkit::set_attention_kernel, py::arg("kernel"),
        "Which attention MultiheadAttention runs on CPU: \"auto\" (the fused kernel where forward + backward "
        "measured faster: float32, >= 96 queries and keys, a mask that blocks at least half of the tiles, "
        "as packed rows do; whatever the grad mode), \"fused\" (whenever the inputs qualify) or \"aten\" "
        "(matmul, softmax, matmul).");
  m.def("attention_kernel", &vlmkit::attention_kernel, "The attention_kernel setting in force.");
  m.def("set_decode_kernel", &vlmkit::set_decode_kernel, py::arg("kernel"),
        "Which implementation generation's cached steps run on CPU: \"auto\" (the fused decoding step "
        "where the decoder qualifies: float32 weights, no autocast, no unmerged LoRA adapter) or \"aten\" "
        "(the decoder's forward per step).");
  m.def("decode_kernel", &vlmkit::decode_kernel, "The decode_kernel setting in force.");
  m.def("set_gemm_kernel", &vlmkit::set_gemm_kernel, py::arg("kernel"),
        "Which GEMMs vlmkit's Linear layers and attention's two batched products run on CPU in float32 (no "
        "autocast): \"auto\" (oneDNN's sgemm, AVX-512, where vlmkit was built against libdnnl; the bias fused "
        "into the product) or \"aten\" (at::linear and at::matmul: OpenBLAS on Debian's LibTorch).");
  m.def("gemm_kernel", &vlmkit::gemm_kernel, "The gemm_kernel setting in force.");
  m.def(
      "linear",
      [](const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
        return vlmkit::kernels::linear(x, w, b ? *b : torch::Tensor());
      },
      py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
      "x weight^T + bias as torch.nn.functional.linear, through the kernel gemm_kernel() picks (oneDNN's "
      "sgemm for float32 CPU tensors without autocast, else at::linear); differentiable.");
  m.def("matmul", &vlmkit::kernels::matmul, py::arg("a"), py::arg("b"),
        "a @ b for a [..., M, K] and b [..., K, N] with the same leading sizes, as torch.matmul, through the "
        "kernel gemm_kernel() picks (one oneDNN sgemm per batch entry for float32 CPU tensors without "
        "autocast, strided views read in place; else at::matmul); differentiable.");
  m.def("have_dnnl_sgemm", &vlmkit::kernels::have_dnnl_sgemm,
        "Whether vlmkit was built against oneDNN's C API (its float32 GEMMs: Linear layers, attention's products, the "
        "fused MLP, then run there).");
  m.def("set_mlp_kernel", &vlmkit::set_mlp_kernel, py::arg("kernel"),
        "Which GELU MLP TransformerBlock runs on CPU: \"auto\" (the fused kernel wherever the block qualifies: "
        "no dropout while training, no unmerged LoRA adapter on fc1 or fc2; it keeps fc1's output but not "
        "gelu's for the backward) or \"aten\" (Linear, gelu, Linear).");
  m.def("mlp_kernel", &vlmkit::mlp_kernel, "The mlp_kernel setting in force.");
  m.def(
      "fused_gelu_mlp",
      [](const torch::Tensor& x, const torch::Tensor& w1, const c10::optional<torch::Tensor>& b1,
         const torch::Tensor& w2, const c10::optional<torch::Tensor>& b2) {
        return vlmkit::kernels::fused_gelu_mlp(x, w1, b1 ? *b1 : torch::Tensor(), w2, b2 ? *b2 : torch::Tensor());
      },
      py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
      "gelu(x w1^T + b1) w2^T + b2 by vlmkit's fused CPU kernel (differentiable in every input; the "
      "backward recomputes gelu from the saved x w1^T + b1). x [..., in], w1 [hidden, in], w2 [out, hidden]; "
      "b1 and b2 may be None.");
  m.def("set_norm_kernel", &vlmkit::set_norm_kernel, py::arg("kernel"),
        "Which RMSNorm vlmkit's Norm runs on CPU (the QK-norm of every attention layer, and RMSNorm "
        "blocks), and which GroupNorm + GELU the conv stage runs: \"auto\" (the fused kernels) or \"aten\" "
        "(the reference written with ATen ops).");
  m.def("norm_kernel", &vlmkit::norm_kernel, "The norm_kernel setting in force.");
  m.def(
      "rms_norm",
      [](const torch::Tensor& x, const torch::Tensor& weight, double eps, const py::object& out_dtype) {
        c10::optional<torch::ScalarType> dtype;
        if (!out_dtype.is_none()) {
          if (!THPDtype_Check(out_dtype.ptr()))
            throw py::type_error("rms_norm: expected out_dtype a torch.dtype or None, got " +
                                 std::string(py::str(py::type::of(out_dtype))));
          dtype = reinterpret_cast<THPDtype*>(out_dtype.ptr())->scalar_type;
        }
        return vlmkit::kernels::rms_norm(x, weight, eps, dtype);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps") = 1e-6, py::arg("out_dtype") = py::none(),
      "x / sqrt(mean(x^2, -1) + eps) * weight by vlmkit's fused CPU kernel (differentiable in x and weight; "
      "statistics in float32). x [..., D] of float32, float64 or bfloat16; weight [D] of x's dtype or float32. "
      "The result has out_dtype when given, else the promotion of x's and weight's dtypes.");
  m.def(
      "group_norm_gelu",
      [](const torch::Tensor& x, int64_t groups, const c10::optional<torch::Tensor>& weight,
         const c10::optional<torch::Tensor>& bias, double eps) {
        return vlmkit::kernels::group_norm_gelu(x, groups, weight ? *weight : torch::Tensor(),
                                                bias ? *bias : torch::Tensor(), eps);
      },
      py::arg("x"), py::arg("groups"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("eps") = 1e-5,
      "gelu(group_norm(x, groups, weight, bias, eps)) by vlmkit's fused CPU kernel, what the conv stage runs after "
      "each convolution (differentiable in x, weight and bias; statistics in float32). x [N, C, ...] of float32, "
      "float64 or bfloat16; weight and bias [C] of x's dtype or float32, or None. The result has x's dtype, computed channels last (channels the innermost dimension of its storage).");
  m.def("rotary", &vlmkit::kernels::rotary, py::arg("x"), py::arg("cos"), py::arg("sin"),
        "x [B, H, T, Dh] rotated by a rotary table (RoPE, halves convention) by vlmkit's fused CPU kernel: "
        "y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin over the two halves of Dh; cos and sin [B, T, Dh/2] "
        "contiguous, float32 (float64 for float64 x). Differentiable in x; the result has x's dtype and layout.");
  m.def(
      "fused_attention",
      [](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const c10::optional<torch::Tensor>& bias,
         c10::optional<double> scale) {
        const torch::Tensor b = bias ? *bias : torch::Tensor();
        const auto why = vlmkit::kernels::fused_attention_unsupported(q, k, v, b);
        if (!why.empty()) throw py::value_error("fused_attention: unsupported inputs (" + why + ")");
        return vlmkit::kernels::fused_attention(q, k, v, b, scale ? *scale : 1.0 / std::sqrt(double(q.size(3))));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias") = py::none(), py::arg("scale") = py::none(),
      "softmax(q k^T * scale + bias) v by vlmkit's fused CPU kernel (differentiable in q, k, v). q [B, H, T, Dh], "
      "k and v [B, H, S, Dh], bias [B | 1, 1, T, S] (entries <= -1e30 block); scale defaults to 1/sqrt(Dh).");

  vlmkit::bindings::ensure_module_base(m);
  vlmkit::bindings::bind_module_functions(m);
  vlmkit::bindings::bind_blocks(m);
  vlmkit::bindings::bind_models(m);
  vlmkit::bindings::bind_generative(m);
  vlmkit::bindings::bind_train(m);
#ifdef VLMKIT_WITH_OPENCV
  vlmkit::bindings::bind_data(m);
  m.attr("with_opencv") = true;
#else
  m.attr("with_opencv") = false;
#endif
}
