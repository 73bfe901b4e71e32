#include "helpers.h"
#include "vlmkit/models/build.h"

using namespace vlmkit;

namespace {
std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}
}  // namespace

TEST_CASE("config: defaults round-trip through JSON", "[config]") {
  for (const char* arch : {"two_tower", "two_leg", "encoder_decoder", "encoder_text_decoder"}) {
    torch::manual_seed(0);
    auto model = build_model({{"architecture", arch}});
    auto config = model_config(*model);
    INFO(config.dump());
    auto rebuilt = build_model(parse_json(config.dump()));
    REQUIRE(model_config(*rebuilt) == config);
    REQUIRE(model->parameters().size() == rebuilt->parameters().size());
  }
}

TEST_CASE("config: every block type can be chosen by name", "[config]") {
  auto model = make_two_leg({{"image_encoder", {{"type", "conv"}, {"channels", {8, 16}}, {"image_size", 32}}},
                             {"fusion", {{"type", "gated"}, {"dim", 48}}},
                             {"head", {{"type", "matching"}}}});
  auto config = model->config();
  REQUIRE(config["image_encoder"]["type"] == "conv");
  REQUIRE(config["fusion"]["dim"] == 48);
  REQUIRE(config["head"]["num_classes"] == 1);
}

TEST_CASE("config: unknown names and keys list what is allowed", "[config][errors]") {
  auto msg = message_of([] { build_model({{"architecture", "three_tower"}}); });
  REQUIRE_THAT(msg, Catch::Contains("'two_tower'") && Catch::Contains("three_tower"));
  msg = message_of([] { make_two_leg({{"fusion", {{"type", "sum"}}}}); });
  REQUIRE_THAT(msg, Catch::Contains("fusion.type") && Catch::Contains("'cross_attention'"));
  msg = message_of([] { make_two_tower({{"image_encoder", {{"dpth", 3}}}}); });
  REQUIRE_THAT(msg, Catch::Contains("image_encoder.dpth") && Catch::Contains("'depth'"));
  CHECK_THROWS_AS(make_two_tower({{"image_encoder", {{"depth", "3"}}}}), c10::TypeError);
  CHECK_THROWS_AS(make_two_tower({{"image_encoder", {{"d_model", 100}, {"num_heads", 3}}}}),
                  c10::ValueError);
  CHECK_THROWS_AS(make_two_tower({{"image_encoder", {{"image_size", 60}, {"patch_size", 8}}}}),
                  c10::ValueError);
  CHECK_THROWS_AS(make_two_tower({{"architecture", "two_leg"}}), c10::ValueError);
  CHECK_THROWS_AS(build_model({{"architecture", "encoder_decoder"}, {"projector", {{"type", "qformer"}}}}),
                  c10::ValueError);
  CHECK_THROWS_AS(parse_json("{\"a\": "), c10::ValueError);
}
