#include "helpers.h"
#include "vlmkit/modules/attention.h"
#include "vlmkit/modules/transformer.h"

using namespace vlmkit;
using vlmkit::test::close;

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
