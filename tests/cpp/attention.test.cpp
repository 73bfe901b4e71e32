#include <ATen/autocast_mode.h>

#include "helpers.h"
#include "vlmkit/kernels/attention.h"
#include "vlmkit/kernels/gemm.h"
#include "vlmkit/kernels/mlp.h"
#include "vlmkit/kernels/norm.h"
#include "vlmkit/modules/attention.h"
#include "vlmkit/modules/conv_stage.h"
#include "vlmkit/modules/transformer.h"

using namespace vlmkit;
using vlmkit::test::close;

namespace {
// A module's output and the gradients of its input and of every parameter, under
// an upstream gradient that weighs each output element differently.
template <typename Module, typename Forward>
std::vector<torch::Tensor> outputs_and_grads(Module& m, const torch::Tensor& x, const Forward& forward) {
  m->zero_grad();
  auto xi = x.clone().requires_grad_();
  auto y = forward(xi);
  (y * torch::linspace(-1, 1, y.numel(), y.options()).view(y.sizes())).sum().backward();
  std::vector<torch::Tensor> grads{y.detach(), xi.grad()};
  for (const auto& p : m->parameters()) grads.push_back(p.grad().clone());
  return grads;
}

void check_all_close(const std::vector<torch::Tensor>& got, const std::vector<torch::Tensor>& want, double rtol,
                     double atol) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) CHECK(torch::allclose(got[i], want[i], rtol, atol));
}
}  // namespace

TEST_CASE("attention: self and cross shapes", "[attention]") {
  torch::manual_seed(0);
  MultiheadAttention self_attn(MultiheadAttentionOptions(32, 4));
  auto x = torch::randn({2, 5, 32});
  REQUIRE(self_attn->forward(x).sizes() == torch::IntArrayRef({2, 5, 32}));
  MultiheadAttention cross(MultiheadAttentionOptions(32, 4).context_dim(48));
  auto ctx = torch::randn({2, 7, 48});
  REQUIRE(cross->forward(x, ctx).sizes() == torch::IntArrayRef({2, 5, 32}));
  CHECK_THROWS_AS(cross->forward(x, torch::randn({2, 7, 32})), c10::ValueError);
  CHECK_THROWS_AS(MultiheadAttention(MultiheadAttentionOptions(30, 4)), c10::ValueError);
}

TEST_CASE("attention: padded keys do not influence the output", "[attention][mask]") {
  torch::manual_seed(0);
  MultiheadAttention attn(MultiheadAttentionOptions(16, 2));
  auto x = torch::randn({1, 6, 16});
  auto mask = torch::tensor({{false, false, false, false, true, true}}).to(torch::kBool);
  auto a = attn->forward(x, {}, mask);
  auto x2 = x.clone();
  x2.slice(1, 4) = 100.0;  // change only the padded positions
  auto b = attn->forward(x2, {}, mask);
  REQUIRE(close(a.slice(1, 0, 4), b.slice(1, 0, 4)));
}

TEST_CASE("attention: causal output ignores the future", "[attention][mask]") {
  torch::manual_seed(0);
  MultiheadAttention attn(MultiheadAttentionOptions(16, 2));
  auto x = torch::randn({2, 6, 16});
  auto a = attn->forward(x, {}, {}, {}, /*causal=*/true);
  auto x2 = x.clone();
  x2.slice(1, 3) = torch::randn({2, 3, 16});
  auto b = attn->forward(x2, {}, {}, {}, /*causal=*/true);
  REQUIRE(close(a.slice(1, 0, 3), b.slice(1, 0, 3)));
  REQUIRE_FALSE(close(a.slice(1, 3), b.slice(1, 3)));
}

TEST_CASE("attention: KV cache gives the same outputs as full causal attention", "[attention][cache]") {
  torch::manual_seed(0);
  TransformerBlock block(TransformerBlockOptions(16, 2).cross_attention(true).context_dim(8));
  block->eval();
  auto x = torch::randn({2, 7, 16});
  auto ctx = torch::randn({2, 3, 8});
  auto full = block->forward(x, {}, {}, true, ctx);
  BlockCache cache;
  std::vector<torch::Tensor> steps;
  steps.push_back(block->forward(x.slice(1, 0, 4), {}, {}, true, ctx, {}, &cache));  // prefill
  for (int64_t t = 4; t < 7; ++t)
    steps.push_back(block->forward(x.slice(1, t, t + 1), {}, {}, true, ctx, {}, &cache));
  REQUIRE(cache.self.length() == 7);
  REQUIRE(cache.cross.length() == 3);
  REQUIRE(close(torch::cat(steps, 1), full, 1e-5));
}

TEST_CASE("attention: gated cross-attention starts closed", "[attention][transformer]") {
  torch::manual_seed(0);
  TransformerBlock gated(TransformerBlockOptions(16, 2).cross_attention(true).gated_cross_attention(true));
  auto x = torch::randn({1, 4, 16});
  auto a = gated->forward(x, {}, {}, false, torch::randn({1, 3, 16}));
  auto b = gated->forward(x, {}, {}, false, torch::randn({1, 3, 16}));
  REQUIRE(close(a, b));
  CHECK_THROWS_AS(gated->forward(x), c10::ValueError);
}

TEST_CASE("attention: gradients reach every parameter", "[attention][grad]") {
  torch::manual_seed(0);
  TransformerBlock block(TransformerBlockOptions(16, 2).cross_attention(true));
  block->forward(torch::randn({2, 4, 16}), {}, {}, false, torch::randn({2, 3, 16})).square().sum().backward();
  vlmkit::test::require_all_grads(*block);
}

TEST_CASE("norm: LayerNorm equals torch's, RMSNorm the formula, in float and bfloat16", "[attention][norm]") {
  torch::manual_seed(0);
  auto x = torch::randn({3, 5, 16});
  Norm layer(16, NormType::layernorm, 1e-5);
  torch::nn::LayerNorm torch_ln(torch::nn::LayerNormOptions({16}));
  REQUIRE(close(layer->forward(x), torch_ln->forward(x), 1e-6));
  Norm rms(16, NormType::rmsnorm, 1e-6);
  {
    torch::NoGradGuard no_grad;
    rms->weight.uniform_(0.5, 1.5);
  }
  REQUIRE(rms->named_parameters().size() == 1);
  auto expected = x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * rms->weight;
  REQUIRE(close(rms->forward(x), expected, 1e-6));
  REQUIRE(close(rms->forward(x.to(torch::kBFloat16)).to(torch::kFloat), expected, 3e-2));
  REQUIRE_THROWS_WITH(rms->forward(torch::randn({2, 8})), Catch::Contains("expected [..., 16]"));
}

TEST_CASE("attention: grouped-query and QK-norm with a KV cache equal full causal attention", "[attention][cache]") {
  torch::manual_seed(0);
  for (int64_t kv : {1, 2, 4}) {
    INFO("num_kv_heads " << kv);
    MultiheadAttention attn(MultiheadAttentionOptions(32, 4).rotary(true).num_kv_heads(kv).qk_norm(true));
    attn->eval();
    REQUIRE(attn->k_proj->weight.size(0) == kv * 8);
    auto x = torch::randn({2, 6, 32});
    auto full = attn->forward(x, {}, {}, {}, /*causal=*/true);
    KVCache cache;
    std::vector<torch::Tensor> steps;
    for (int64_t t = 0; t < 6; ++t)
      steps.push_back(attn->forward(x.slice(1, t, t + 1), {}, {}, {}, true, &cache));
    REQUIRE(cache.key.size(1) == kv);  // the cache holds only the key/value heads
    REQUIRE(close(torch::cat(steps, 1), full, 1e-5));
  }
  REQUIRE_THROWS_WITH(MultiheadAttention(MultiheadAttentionOptions(32, 4).num_kv_heads(3)),
                      Catch::Contains("must divide num_heads"));
}

namespace {
struct KernelScope {  // restores the attention_kernel setting
  std::string before = vlmkit::attention_kernel();
  ~KernelScope() { vlmkit::set_attention_kernel(before); }
};
}  // namespace

TEST_CASE("fused attention: MultiheadAttention gives ATen's outputs and gradients", "[attention][fused]") {
  KernelScope scope;
  torch::manual_seed(0);
  for (const bool gqa : {false, true}) {
    MultiheadAttention attn(MultiheadAttentionOptions(64, 4).num_kv_heads(gqa ? 2 : 0).rotary(true));
    auto x = torch::randn({3, 130, 64});
    auto padding = torch::zeros({3, 130}, torch::kBool);
    padding.slice(1, 100) = true;  // the last 30 keys are padding
    std::vector<torch::Tensor> outs, grads;
    for (const char* kernel : {"aten", "fused"}) {
      vlmkit::set_attention_kernel(kernel);
      attn->zero_grad();
      auto xi = x.clone().requires_grad_();
      auto out = attn->forward(xi, {}, padding, {}, /*causal=*/true);
      out.pow(2).sum().backward();
      outs.push_back(out.detach());
      grads.push_back(xi.grad());
      grads.push_back(attn->q_proj->weight.grad().clone());
      grads.push_back(attn->k_proj->weight.grad().clone());
    }
    INFO("grouped-query " << gqa);
    REQUIRE(close(outs[0], outs[1], 1e-5));
    for (size_t i = 0; i < 3; ++i) {
      const double scale = std::max(1.0, grads[i].abs().max().item<double>());
      REQUIRE(close(grads[i], grads[i + 3], 1e-5 * scale));
    }
  }
}

TEST_CASE("fused attention: float64 outputs and gradients equal the formula's", "[attention][fused]") {
  torch::manual_seed(0);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto q = torch::randn({2, 3, 40, 8}, opts).requires_grad_();
  auto k = torch::randn({2, 3, 90, 8}, opts).requires_grad_();
  auto v = torch::randn({2, 3, 90, 8}, opts).requires_grad_();
  auto allowed = torch::rand({2, 1, 40, 90}, opts) > 0.6;
  allowed.select(2, 5).fill_(false);  // a row that sees nothing: uniform weights
  auto bias = torch::zeros({2, 1, 40, 90}, opts).masked_fill(allowed.logical_not(), vlmkit::detail::mask_fill_value(torch::kDouble));
  auto out = kernels::fused_attention(q, k, v, bias, 0.3);
  auto ref = torch::softmax(torch::matmul(q * 0.3, k.transpose(-2, -1)) + bias, -1).matmul(v);
  REQUIRE(close(out, ref, 1e-12));
  auto g = torch::randn_like(out);
  const std::vector<torch::Tensor> inputs{q, k, v};
  auto got = torch::autograd::grad({out}, inputs, {g});
  auto want = torch::autograd::grad({ref}, inputs, {g});
  for (size_t i = 0; i < 3; ++i) REQUIRE(close(got[i], want[i], 1e-11));
  CHECK_THROWS_WITH(kernels::fused_attention(q, k, v, bias.slice(2, 0, 10), 0.3),
                    Catch::Contains("[B | 1, 1, T, S]"));
  CHECK_THROWS_AS(vlmkit::set_attention_kernel("flash"), c10::ValueError);
}

TEST_CASE("fused attention: the auto rule takes float32 rows whose mask blocks most tiles", "[attention][fused]") {
  KernelScope scope;
  vlmkit::set_attention_kernel("auto");
  const int64_t t = 256;
  const float blocked = vlmkit::detail::mask_fill_value(torch::kFloat);
  // Packed rows: eight examples of 32 positions, causal inside each (3/4 of the
  // 64-key tiles blocked); causal alone blocks 3/8.
  auto seg = torch::arange(t).div(32, "floor");
  auto allowed = seg.unsqueeze(1).eq(seg.unsqueeze(0)).logical_and(torch::ones({t, t}, torch::kBool).tril());
  auto packed = torch::zeros({2, 1, t, t}).masked_fill(allowed.logical_not(), blocked);
  auto causal = torch::zeros({1, 1, t, t}).masked_fill(torch::ones({t, t}, torch::kBool).triu(1), blocked);
  CHECK(kernels::blocked_tile_fraction(packed) > 0.5);
  CHECK(kernels::blocked_tile_fraction(causal) < 0.5);
  CHECK(kernels::blocked_tile_fraction(torch::Tensor()) == 0.0);
  auto q = torch::randn({2, 4, t, 32});
  CHECK(kernels::use_fused_attention(q, t, packed));
  CHECK_FALSE(kernels::use_fused_attention(q, t, causal));
  CHECK_FALSE(kernels::use_fused_attention(q, t, torch::Tensor()));
  CHECK_FALSE(kernels::use_fused_attention(q.to(torch::kBFloat16), t, packed.to(torch::kBFloat16)));
  CHECK_FALSE(kernels::use_fused_attention(q.slice(2, 0, 64), 64, packed.slice(2, 0, 64).slice(3, 0, 64)));
  vlmkit::set_attention_kernel("fused");
  CHECK(kernels::use_fused_attention(q, t, causal));
  vlmkit::set_attention_kernel("aten");
  CHECK_FALSE(kernels::use_fused_attention(q, t, packed));
}

TEST_CASE("KV cache: appends into doubling storage equal concatenation, beams select rows", "[attention][cache]") {
  torch::manual_seed(0);
  KVCache cache;
  std::vector<torch::Tensor> keys, values;
  for (int64_t t : {5, 1, 1, 14, 1}) {  // past the first capacity (16) and its doubling
    keys.push_back(torch::randn({3, 2, t, 8}));
    values.push_back(torch::randn({3, 2, t, 8}));
    cache.append(keys.back(), values.back());
    REQUIRE(torch::equal(cache.key, torch::cat(keys, 2)));
    REQUIRE(torch::equal(cache.value, torch::cat(values, 2)));
  }
  REQUIRE(cache.length() == 22);
  auto index = torch::tensor({2, 2, 0}, torch::kLong);
  cache.select(index);
  REQUIRE(torch::equal(cache.key, torch::cat(keys, 2).index_select(0, index)));
  cache.append(keys[0], values[0]);  // after a select the storage keeps growing
  REQUIRE(torch::equal(cache.key, torch::cat({torch::cat(keys, 2).index_select(0, index), keys[0]}, 2)));
  // Under autograd the cache concatenates, so earlier steps' graphs stay valid:
  // pow saves the first step's keys, which an in-place append would overwrite.
  KVCache graph;
  auto k1 = torch::randn({1, 1, 2, 4}, torch::requires_grad()), k2 = torch::randn({1, 1, 1, 4}, torch::requires_grad());
  graph.append(k1, k1 * 2);
  auto first = graph.key.pow(2).sum();
  graph.append(k2, k2 * 2);
  (first + graph.key.pow(2).sum()).backward();
  REQUIRE(torch::allclose(k1.grad(), 4 * k1));
  REQUIRE(torch::allclose(k2.grad(), 2 * k2));
}

TEST_CASE("rotary: the table kept for a positions tensor follows in-place changes", "[attention]") {
  auto x = torch::randn({1, 2, 3, 8});
  auto pos = torch::tensor({{0, 1, 2}}, torch::kLong);
  auto before = vlmkit::detail::apply_rotary(x, pos, 10000.0);
  REQUIRE(torch::equal(vlmkit::detail::apply_rotary(x, pos, 10000.0), before));
  pos.add_(5);  // same tensor, new values
  auto fresh = vlmkit::detail::apply_rotary(x, pos.clone(), 10000.0);
  REQUIRE(torch::equal(vlmkit::detail::apply_rotary(x, pos, 10000.0), fresh));
  REQUIRE_FALSE(torch::allclose(fresh, before));
  REQUIRE_FALSE(torch::allclose(vlmkit::detail::apply_rotary(x, pos, 500.0), fresh));  // another theta
}

TEST_CASE("fused GELU MLP: the block's loss and gradients equal ATen's", "[mlp][kernels]") {
  torch::manual_seed(0);
  TransformerBlock block(TransformerBlockOptions(32, 4));
  block->to(torch::kDouble);
  auto x = torch::randn({3, 7, 32}, torch::kDouble);
  auto run = [&](const std::string& kernel) {
    set_mlp_kernel(kernel);
    return outputs_and_grads(block, x, [&](const torch::Tensor& xi) { return block->forward(xi, {}, {}, true); });
  };
  const auto reference = run("aten");
  const auto fused = run("auto");
  set_mlp_kernel("auto");
  check_all_close(fused, reference, 1e-9, 1e-11);
  CHECK_THROWS_AS(set_mlp_kernel("fast"), c10::ValueError);
  CHECK_THROWS_AS(kernels::fused_gelu_mlp(torch::randn({2, 5}), torch::randn({8, 4}), {}, torch::randn({4, 8}), {}),
                  c10::ValueError);
}

TEST_CASE("oneDNN GEMMs: a float32 block's output and gradients (Linear layers, attention's products) equal ATen's", "[gemm][kernels]") {
  torch::manual_seed(0);
  TransformerBlock block(TransformerBlockOptions(64, 4));
  // 300 rows x 64 x 256: the MLP's products are cut across the pool's threads.
  auto x = torch::randn({3, 100, 64});
  auto run = [&](const std::string& kernel) {
    set_gemm_kernel(kernel);
    return outputs_and_grads(block, x, [&](const torch::Tensor& xi) { return block->forward(xi, {}, {}, true); });
  };
  const auto reference = run("aten");
  const auto onednn = run("auto");
  set_gemm_kernel("auto");
  check_all_close(onednn, reference, 1e-3, 1e-5);
  // One row with a bias: the product must not be written into the bias.
  auto w = torch::randn({5, 3}), b = torch::randn({5});
  const auto b_before = b.clone();
  auto one = kernels::linear(torch::randn({3}), w, b);
  CHECK(torch::equal(b, b_before));
  CHECK(one.sizes() == torch::IntArrayRef{5});
  CHECK_THROWS_AS(set_gemm_kernel("fast"), c10::ValueError);
}

TEST_CASE("fused RMSNorm: QK-norm attention's output and gradients equal the ATen reference's", "[norm][kernels]") {
  torch::manual_seed(0);
  MultiheadAttention attn(MultiheadAttentionOptions(32, 4).qk_norm(true));
  attn->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : attn->parameters())
      if (p.dim() == 1) p.uniform_(0.5, 1.5);  // the norms' weights start at 1
  }
  auto x = torch::randn({2, 6, 32}, torch::kDouble);
  auto run = [&](const std::string& kernel) {
    set_norm_kernel(kernel);
    return outputs_and_grads(attn, x, [&](const torch::Tensor& xi) { return attn->forward(xi, {}, {}, {}, true); });
  };
  const auto reference = run("aten");
  const auto fused = run("auto");
  set_norm_kernel("auto");
  check_all_close(fused, reference, 1e-9, 1e-11);
  CHECK_THROWS_AS(set_norm_kernel("fast"), c10::ValueError);
  CHECK_THROWS_AS(kernels::rms_norm(torch::randn({2, 5}), torch::ones({4}), 1e-6), c10::ValueError);
  // bfloat16 rows with a float32 weight, returned in bfloat16: one rounding of the float32 result.
  auto xb = torch::randn({5, 32}).to(torch::kBFloat16);
  auto w = torch::rand({32}) + 0.5;
  auto xf = xb.to(torch::kFloat);
  auto ref = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + 1e-6) * w;
  auto got = kernels::rms_norm(xb, w, 1e-6, torch::kBFloat16);
  REQUIRE(got.scalar_type() == torch::kBFloat16);
  // within half a bfloat16 ulp (2^-8 relative) of the float32 result
  CHECK(((got.to(torch::kFloat) - ref).abs() <= std::ldexp(1.0, -8) * ref.abs() + 1e-6).all().item<bool>());
}

TEST_CASE("fused GroupNorm + GELU: the conv stage's output and gradients equal ATen's", "[norm][kernels]") {
  torch::manual_seed(0);
  ConvStage stem(ConvStageOptions().image_size(16).in_channels(3).channels({8, 16}).d_model(24));
  stem->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : stem->parameters())
      if (p.dim() == 1) p.uniform_(0.5, 1.5);  // GroupNorm starts at weight 1, bias 0
  }
  auto x = torch::randn({3, 3, 16, 16}, torch::kDouble);
  auto run = [&](const std::string& kernel) {
    set_norm_kernel(kernel);  // "auto": the fused kernel, channels last
    return outputs_and_grads(stem, x, [&](const torch::Tensor& xi) { return stem->forward(xi).tokens; });
  };
  const auto reference = run("aten");
  const auto fused = run("auto");
  set_norm_kernel("auto");
  check_all_close(fused, reference, 1e-9, 1e-11);
  CHECK_THROWS_AS(kernels::group_norm_gelu(torch::randn({2, 6, 4}), 4, {}, {}), c10::ValueError);
}

TEST_CASE("fused rotary: rotary self-attention's output and gradients equal ATen's", "[attention][kernels]") {
  torch::manual_seed(0);
  MultiheadAttention attn(MultiheadAttentionOptions(32, 4).rotary(true));
  attn->to(torch::kDouble);
  auto x = torch::randn({2, 9, 32}, torch::kDouble);
  auto run = [&](const std::string& kernel) {
    set_attention_kernel(kernel);  // float64 attention itself is ATen's either way
    return outputs_and_grads(attn, x, [&](const torch::Tensor& xi) { return attn->forward(xi, {}, {}, {}, true); });
  };
  const auto reference = run("aten");
  const auto fused = run("auto");
  set_attention_kernel("auto");
  check_all_close(fused, reference, 1e-9, 1e-11);
  CHECK_THROWS_AS(kernels::rotary(torch::randn({1, 2, 3, 5}), torch::randn({1, 3, 2}), torch::randn({1, 3, 2})),
                  c10::ValueError);
}

TEST_CASE("oneDNN GEMMs: Linear under bf16 autocast rounds as autocast and keeps float32 gradients", "[gemm][kernels]") {
  torch::manual_seed(0);
  auto x = torch::randn({6, 40}).requires_grad_();
  auto w = (0.2 * torch::randn({24, 40})).requires_grad_();
  auto b = torch::randn({24}).requires_grad_();
  at::autocast::set_cpu_enabled(true);
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  auto y = kernels::linear(x, w, b);
  at::autocast::set_cpu_enabled(false);
  at::autocast::clear_cache();
  REQUIRE(y.scalar_type() == torch::kBFloat16);
  auto xr = x.detach().to(torch::kBFloat16).to(torch::kDouble), wr = w.detach().to(torch::kBFloat16).to(torch::kDouble);
  auto exact = xr.matmul(wr.t()) + b.detach().to(torch::kDouble);
  CHECK(((y.to(torch::kDouble) - exact).abs() <= std::ldexp(1.0, -8) * exact.abs() + 1e-6).all().item<bool>());
  y.to(torch::kFloat).sum().backward();
  REQUIRE(x.grad().scalar_type() == torch::kFloat);
  REQUIRE(w.grad().scalar_type() == torch::kFloat);
  if (!kernels::have_dnnl_sgemm()) return;  // ATen's path rounds the gradients to bf16
  // Every output's upstream gradient is 1 (exact in bf16): the float32 gradients are exact sums.
  CHECK(torch::allclose(w.grad().to(torch::kDouble), torch::ones({6, 24}, torch::kDouble).t().matmul(xr), 1e-5, 1e-5));
  CHECK(torch::allclose(b.grad(), torch::full({24}, 6.0f)));
}
