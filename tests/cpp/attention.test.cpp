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
