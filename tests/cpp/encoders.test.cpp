#include "helpers.h"
#include "vlmkit/modules/conv_stage.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"

using namespace vlmkit;
using vlmkit::test::close;

namespace {
ViTOptions tiny_vit() { return ViTOptions().image_size(32).patch_size(8).d_model(32).depth(2).num_heads(4); }
TextEncoderOptions tiny_text() {
  return TextEncoderOptions().vocab_size(64).max_len(16).d_model(32).depth(2).num_heads(4);
}
}  // namespace

TEST_CASE("vit: shapes for every pooling, position and stem", "[encoder][vit]") {
  for (auto pool : {ImagePool::cls, ImagePool::mean, ImagePool::map})
    for (auto pos : {PosEmbedding::learned, PosEmbedding::sincos2d})
      for (auto stem : {ViTStem::patch, ViTStem::conv}) {
        torch::manual_seed(0);
        ViT vit(tiny_vit().pool(pool).pos_embedding(pos).stem(stem));
        auto out = vit->forward(torch::rand({3, 3, 32, 32}));
        INFO(to_name(pool) << " " << to_name(pos) << " " << to_name(stem));
        REQUIRE(out.tokens.sizes() == torch::IntArrayRef({3, 16, 32}));
        REQUIRE(out.pooled.sizes() == torch::IntArrayRef({3, 32}));
        REQUIRE(out.grid == std::array<int64_t, 2>{4, 4});
        // Other resolutions: sincos directly, learned by interpolation.
        auto wide = vit->forward(torch::rand({1, 3, 32, 64}));
        REQUIRE(wide.tokens.sizes() == torch::IntArrayRef({1, 32, 32}));
        REQUIRE(wide.grid == std::array<int64_t, 2>{4, 8});
      }
}

TEST_CASE("vit: bad inputs and configs raise ValueError/TypeError", "[encoder][vit][errors]") {
  ViT vit(tiny_vit());
  CHECK_THROWS_AS(vit->forward(torch::rand({3, 32, 32})), c10::ValueError);
  CHECK_THROWS_AS(vit->forward(torch::rand({1, 1, 32, 32})), c10::ValueError);
  CHECK_THROWS_AS(vit->forward(torch::rand({1, 3, 30, 32})), c10::ValueError);
  CHECK_THROWS_AS(vit->forward(torch::ones({1, 3, 32, 32}, torch::kLong)), c10::TypeError);
  CHECK_THROWS_AS(ViT(tiny_vit().patch_size(5)), c10::ValueError);
  CHECK_THROWS_AS(ViT(tiny_vit().num_heads(5)), c10::ValueError);
  CHECK_THROWS_AS(ViT(tiny_vit().patch_size(6).image_size(36).stem(ViTStem::conv)), c10::ValueError);
  // The message names what was expected and what came. Checked after the call so
  // that a forward that accepts [2, 64, 64] (no exception) fails the test.
  std::string message;
  try {
    vit->forward(torch::rand({2, 64, 64}));
  } catch (const c10::ValueError& e) {
    message = e.what_without_backtrace();
  }
  REQUIRE_THAT(message, Catch::Contains("expected images of shape [B, 3, H, W], got [2, 64, 64]"));
}

TEST_CASE("conv stage: token grid and float32 gradients match float64", "[encoder][conv]") {
  torch::manual_seed(0);
  ConvStage conv(ConvStageOptions().image_size(32).channels({8, 16}).d_model(24));
  auto x = torch::randn({4, 3, 32, 32});
  auto out = conv->forward(x);
  REQUIRE(out.tokens.sizes() == torch::IntArrayRef({4, 64, 24}));
  REQUIRE(out.grid == std::array<int64_t, 2>{8, 8});
  // Regression: LibTorch 1.13's GELU backward is wrong for transposed
  // gradients; the conv stage must not hand it one.
  auto weights = torch::randn({24});
  auto grads = [&](torch::Dtype dtype) {
    conv->to(dtype);
    conv->zero_grad();
    (conv->forward(x.to(dtype)).tokens * weights.to(dtype)).sum().backward();
    std::vector<torch::Tensor> g;
    for (auto& p : conv->parameters()) g.push_back(p.grad().to(torch::kDouble).clone());
    return g;
  };
  auto g32 = grads(torch::kFloat), g64 = grads(torch::kDouble);
  for (size_t i = 0; i < g32.size(); ++i) {
    const double scale = g64[i].abs().max().item<double>();
    REQUIRE((g32[i] - g64[i]).abs().max().item<double>() <= 1e-4 * scale + 1e-6);
  }
}

TEST_CASE("text encoder: padding never changes the pooled vector", "[encoder][text][mask]") {
  for (auto pool : {TextPool::mean, TextPool::cls, TextPool::last}) {
    torch::manual_seed(0);
    TextEncoder enc(tiny_text().pool(pool));
    auto ids = torch::tensor({{1, 5, 9, 13, 2}}, torch::kLong);
    auto padded = torch::tensor({{1, 5, 9, 13, 2, 0, 0, 0}}, torch::kLong);
    auto a = enc->forward(ids).pooled;
    auto b = enc->forward(padded).pooled;
    INFO("pool " << to_name(pool));
    REQUIRE(close(a, b, 1e-5));
    // Explicit masks work the same as the pad id.
    auto mask = padded.eq(0);
    auto other = padded.clone();
    other.slice(1, 5) = 7;
    REQUIRE(close(enc->forward(other, mask).pooled, a, 1e-5));
  }
}

TEST_CASE("text encoder: ids out of range, too long, wrong dtype", "[encoder][text][errors]") {
  TextEncoder enc(tiny_text());
  CHECK_THROWS_AS(enc->forward(torch::tensor({{1, 64}}, torch::kLong)), c10::IndexError);
  CHECK_THROWS_AS(enc->forward(torch::tensor({{-1, 3}}, torch::kLong)), c10::IndexError);
  CHECK_THROWS_AS(enc->forward(torch::ones({1, 17}, torch::kLong)), c10::ValueError);
  CHECK_THROWS_AS(enc->forward(torch::ones({1, 4}, torch::kInt)), c10::TypeError);
  CHECK_THROWS_AS(enc->forward(torch::ones({4}, torch::kLong)), c10::ValueError);
  CHECK_THROWS_AS(enc->forward(torch::ones({1, 4}, torch::kLong), torch::zeros({1, 5}, torch::kBool)),
                  c10::ValueError);
}

TEST_CASE("encoders: gradients reach every parameter", "[encoder][grad]") {
  torch::manual_seed(0);
  for (auto stem : {ViTStem::patch, ViTStem::conv}) {
    ViT vit(tiny_vit().stem(stem));
    vit->forward(torch::rand({2, 3, 32, 32})).pooled.square().sum().backward();
    vlmkit::test::require_all_grads(*vit);
  }
  TextEncoder text(tiny_text());
  auto out = text->forward(torch::randint(1, 64, {2, 6}, torch::kLong));
  (out.pooled.square().sum() + out.tokens.square().sum()).backward();
  vlmkit::test::require_all_grads(*text);
}

TEST_CASE("encoders: same seed, same weights and outputs", "[encoder][determinism]") {
  auto run = [] {
    torch::manual_seed(42);
    ViT vit(tiny_vit());
    return vit->forward(torch::rand({2, 3, 32, 32})).pooled;
  };
  REQUIRE(torch::equal(run(), run()));
}

TEST_CASE("vit: depth 0 (patch embedding and norm only) still checks and encodes images", "[vit][errors]") {
  vlmkit::ViT vit(vlmkit::ViTOptions().image_size(16).patch_size(8).d_model(16).num_heads(2).depth(0));
  auto out = vit->forward(torch::rand({2, 3, 16, 16}));
  REQUIRE(out.tokens.sizes() == torch::IntArrayRef({2, 4, 16}));
  REQUIRE_THROWS_AS(vit->forward(torch::rand({2, 3, 16, 16}, torch::kDouble)), c10::TypeError);
  REQUIRE_THROWS_AS(vit->forward(torch::full({1, 3, 16, 16}, NAN)), c10::ValueError);
}
