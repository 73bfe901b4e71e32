#include "helpers.h"
#include "vlmkit/fusion/two_leg_fusion.h"
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
  for (const auto& row : contrastive_loss_table().rows()) {
    const auto& loss = row.name;
    torch::manual_seed(0);
    auto model = make_two_tower(tiny_encoders({{"loss", loss}, {"embed_dim", 16}}));
    REQUIRE(model->logit_bias.defined() == row.learned_bias);
    auto images = torch::rand({4, 3, 32, 32});
    auto ids = torch::randint(1, 64, {4, 7}, torch::kLong);
    auto out = model->forward(images, ids);
    INFO(loss);
    REQUIRE(out.logits_per_image.sizes() == torch::IntArrayRef({4, 4}));
    REQUIRE(close(out.logits_per_text, out.logits_per_image.t()));
    REQUIRE(close(out.image_embeds.norm(2, 1), torch::ones({4})));
    const double expected = (loss == "clip" ? clip_loss(out.logits_per_image) : siglip_loss(out.logits_per_image))
                                .item<double>();
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
  REQUIRE(head_registry().names() == std::vector<std::string>{"classification", "matching"});
  for (const auto& fusion : fusion_registry().names())
    for (const auto& head : head_registry().names()) {
      torch::manual_seed(0);
      json head_config = {{"type", head}};
      if (head == "classification") head_config["num_classes"] = 5;
      auto model = make_two_leg(tiny_encoders(
          {{"fusion", {{"type", fusion}, {"dim", 32}}}, {"head", head_config}}));
      auto images = torch::rand({3, 3, 32, 32});
      auto ids = torch::randint(1, 64, {3, 6}, torch::kLong);
      const bool matching = head == "matching";
      auto labels = matching ? torch::tensor({1.0, 0.0, 1.0}) : torch::tensor({0, 4, 2}, torch::kLong);
      auto out = model->forward(images, ids, {}, labels);
      INFO(fusion << " + " << head);
      REQUIRE(out.logits.sizes() == (matching ? torch::IntArrayRef({3}) : torch::IntArrayRef({3, 5})));
      REQUIRE(out.fused.sizes() == torch::IntArrayRef({3, 32}));
      out.loss.backward();
      vlmkit::test::require_all_grads(*model);
      REQUIRE_FALSE(model->forward(images, ids).loss.defined());
      REQUIRE(model->config()["head"]["type"] == head);
    }
}

TEST_CASE("models: the architecture table builds every architecture and reads its config back", "[model]") {
  REQUIRE(architecture_table().names() ==
          std::vector<std::string>{"encoder_decoder", "encoder_text_decoder", "two_leg", "two_tower"});
  for (const auto& row : architecture_table().rows()) {
    INFO(row.name);
    auto model = build_model({{"architecture", row.name}});
    const auto config = model_config(*model);
    REQUIRE(config["architecture"] == row.name);
    REQUIRE(model_config(*build_model(config)) == config);  // the config rebuilds the same model
    for (const auto& other : architecture_table().rows())
      if (other.name != row.name) REQUIRE(other.config_of(*model).is_null());
  }
  REQUIRE(model_config(*build_model(json())).at("architecture") == "two_tower");  // the default
  REQUIRE_THROWS_WITH(build_model({{"architecture", "three_tower"}}),
                      Catch::Contains("config key 'architecture': unknown architecture 'three_tower'; expected one of "
                                      "'encoder_decoder', 'encoder_text_decoder', 'two_leg', 'two_tower'"));
  REQUIRE_THROWS_WITH(make_two_leg({{"architecture", "two_tower"}}),
                      Catch::Contains("config says architecture 'two_tower' but a 'two_leg' model is being built"));
  torch::nn::Module stranger;
  REQUIRE_THROWS_WITH(model_config(stranger), Catch::Contains("is not a vlmkit architecture"));
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
