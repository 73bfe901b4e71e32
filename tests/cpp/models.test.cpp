#include "helpers.h"
#include "vlmkit/models/build.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"

using namespace vlmkit;
using vlmkit::test::close;

namespace {
json tiny_encoders(json config) {
  config["image_encoder"] = {{"image_size", 32}, {"patch_size", 8}, {"d_model", 32},
                             {"depth", 1}, {"num_heads", 4}};
  config["text_encoder"] = {{"vocab_size", 64}, {"max_len", 16}, {"d_model", 32},
                            {"depth", 1}, {"num_heads", 4}};
  return config;
}
}  // namespace

TEST_CASE("two-tower: outputs, losses and gradients", "[model][two_tower]") {
  for (const char* loss : {"clip", "siglip"}) {
    torch::manual_seed(0);
    auto model = make_two_tower(tiny_encoders({{"loss", loss}, {"embed_dim", 16}}));
    auto images = torch::rand({4, 3, 32, 32});
    auto ids = torch::randint(1, 64, {4, 7}, torch::kLong);
    auto out = model->forward(images, ids);
    INFO(loss);
    REQUIRE(out.logits_per_image.sizes() == torch::IntArrayRef({4, 4}));
    REQUIRE(close(out.logits_per_text, out.logits_per_image.t()));
    REQUIRE(close(out.image_embeds.norm(2, 1), torch::ones({4})));
    const double expected = std::string(loss) == "clip" ? clip_loss(out.logits_per_image).item<double>()
                                                        : siglip_loss(out.logits_per_image).item<double>();
    REQUIRE(out.loss.item<double>() == Approx(expected));
    out.loss.backward();
    vlmkit::test::require_all_grads(*model);
    auto probs = model->zero_shot(images, ids.slice(0, 0, 3));
    REQUIRE(probs.sizes() == torch::IntArrayRef({4, 3}));
    REQUIRE(close(probs.sum(1), torch::ones({4})));
    CHECK_THROWS_AS(model->forward(images, ids.slice(0, 0, 3)), c10::ValueError);
  }
}

TEST_CASE("two-tower: logit scale is clamped as CLIP does", "[model][two_tower]") {
  auto model = make_two_tower(tiny_encoders({{"logit_scale_init", 10.0}, {"max_logit_scale", 100.0}}));
  REQUIRE(model->scale().item<double>() == Approx(100.0));
}

TEST_CASE("two-tower: templates compose concrete encoders at compile time", "[model][template]") {
  torch::manual_seed(0);
  auto vit = std::make_shared<ViTImpl>(ViTOptions().image_size(32).patch_size(8).d_model(32).depth(1));
  auto text = std::make_shared<TextEncoderImpl>(TextEncoderOptions().vocab_size(64).d_model(32).depth(1));
  TwoTowerImpl<ViTImpl, TextEncoderImpl> model(vit, text, TwoTowerOptions().embed_dim(16));
  auto out = model.forward(torch::rand({2, 3, 32, 32}), torch::randint(1, 64, {2, 5}, torch::kLong));
  REQUIRE(out.loss.dim() == 0);
  REQUIRE(model.config()["image_encoder"]["type"] == "vit");
}

TEST_CASE("two-leg: every fusion with classification and matching heads", "[model][two_leg]") {
  for (const char* fusion : {"concat_mlp", "attention", "gated", "cross_attention"})
    for (const char* head : {"classification", "matching"}) {
      torch::manual_seed(0);
      json head_config = {{"type", head}};
      if (std::string(head) == "classification") head_config["num_classes"] = 5;
      auto model = make_two_leg(tiny_encoders(
          {{"fusion", {{"type", fusion}, {"dim", 32}}}, {"head", head_config}}));
      auto images = torch::rand({3, 3, 32, 32});
      auto ids = torch::randint(1, 64, {3, 6}, torch::kLong);
      const bool matching = std::string(head) == "matching";
      auto labels = matching ? torch::tensor({1.0, 0.0, 1.0}) : torch::tensor({0, 4, 2}, torch::kLong);
      auto out = model->forward(images, ids, {}, labels);
      INFO(fusion << " + " << head);
      REQUIRE(out.logits.sizes() == (matching ? torch::IntArrayRef({3}) : torch::IntArrayRef({3, 5})));
      REQUIRE(out.fused.sizes() == torch::IntArrayRef({3, 32}));
      out.loss.backward();
      vlmkit::test::require_all_grads(*model);
      REQUIRE_FALSE(model->forward(images, ids).loss.defined());
    }
}

TEST_CASE("models: a few optimizer steps lower the loss on a fixed batch", "[model][train]") {
  torch::manual_seed(0);
  auto model = make_two_leg(tiny_encoders({{"head", {{"num_classes", 4}}}}));
  auto images = torch::rand({8, 3, 32, 32});
  auto ids = torch::randint(1, 64, {8, 6}, torch::kLong);
  auto labels = torch::randint(0, 4, {8}, torch::kLong);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
  const double first = model->forward(images, ids, {}, labels).loss.item<double>();
  for (int i = 0; i < 30; ++i) {
    opt.zero_grad();
    model->forward(images, ids, {}, labels).loss.backward();
    opt.step();
  }
  REQUIRE(model->forward(images, ids, {}, labels).loss.item<double>() < 0.5 * first);
}
