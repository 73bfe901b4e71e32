#include "helpers.h"
#include "vlmkit/fusion/decoder_fusion.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/modules/encoder.h"

using namespace vlmkit;
using vlmkit::test::close;

namespace {
EncoderOutput fake(int64_t b, int64_t n, int64_t d, bool pad = false) {
  EncoderOutput out;
  out.tokens = torch::randn({b, n, d}, torch::requires_grad());
  out.pooled = torch::randn({b, d}, torch::requires_grad());
  if (pad) {
    out.padding_mask = torch::zeros({b, n}, torch::kBool);
    out.padding_mask.slice(1, n - 2) = true;
  }
  return out;
}

std::vector<std::shared_ptr<FusionModule>> all_fusions(int64_t di, int64_t dt) {
  return {std::make_shared<ConcatMlpFusionImpl>(ConcatMlpFusionOptions(di, dt).dim(24)),
          std::make_shared<AttentionFusionImpl>(AttentionFusionOptions(di, dt).dim(24)),
          std::make_shared<GatedFusionImpl>(GatedFusionOptions(di, dt).dim(24)),
          std::make_shared<CrossAttentionFusionImpl>(
              CrossAttentionFusionOptions(di, dt).dim(24).num_heads(4).num_layers(2))};
}
}  // namespace

TEST_CASE("fusion: every block maps two encoder outputs to [B, dim]", "[fusion]") {
  torch::manual_seed(0);
  for (auto& fusion : all_fusions(16, 20)) {
    INFO(fusion->name());
    auto image = fake(3, 9, 16), text = fake(3, 5, 20, true);
    auto out = fusion->forward(image, text);
    REQUIRE(out.sizes() == torch::IntArrayRef({3, 24}));
    REQUIRE(fusion->output_dim() == 24);
    out.square().sum().backward();
    vlmkit::test::require_all_grads(*fusion);
    CHECK_THROWS_AS(fusion->forward(fake(3, 9, 17), text), c10::ValueError);
  }
}

TEST_CASE("fusion: attention weights are a softmax over the two modalities", "[fusion]") {
  torch::manual_seed(0);
  AttentionFusion fusion(AttentionFusionOptions(8, 8).dim(16));
  fusion->forward(fake(4, 3, 8), fake(4, 3, 8));
  const auto& w = fusion->last_weights();
  REQUIRE(w.sizes() == torch::IntArrayRef({4, 2}));
  REQUIRE(close(w.sum(1), torch::ones({4})));
}

TEST_CASE("fusion: cross-attention ignores padded text positions", "[fusion][mask]") {
  torch::manual_seed(0);
  CrossAttentionFusion fusion(CrossAttentionFusionOptions(8, 16).dim(16).num_heads(2));
  auto image = fake(1, 4, 8), text = fake(1, 6, 16, true);
  auto a = fusion->forward(image, text);
  auto changed = text;
  changed.tokens = text.tokens.detach().clone();
  changed.tokens.slice(1, 4) = 50.0;
  REQUIRE(close(fusion->forward(image, changed), a));
}

TEST_CASE("decoder-fusion slot: each block owns its memory width, decoder default and checks", "[fusion][decoder_fusion]") {
  auto decoder = TextDecoderOptions().d_model(48).context_dim(32);
  for (const auto& name : enum_names<DecoderFusionType>()) {
    INFO(name);
    auto block = make_decoder_fusion(from_name<DecoderFusionType>(name), 5);
    REQUIRE(to_name(block->type()) == name);
    REQUIRE(block->config() == name);
    const bool concat = block->type() == DecoderFusionType::concat;
    REQUIRE(block->memory_width(decoder) == (concat ? 48 : 32));
    REQUIRE(block->default_cross_attention_every() == (concat ? 0 : 1));
    auto fitting = TextDecoderOptions(decoder).cross_attention_every(block->default_cross_attention_every());
    block->check_slots(block->memory_width(fitting), fitting, "test");
    CHECK_THROWS_AS(block->check_slots(block->memory_width(fitting) + 1, fitting, "test"), c10::ValueError);
    auto other = TextDecoderOptions(decoder).cross_attention_every(concat ? 1 : 0);
    CHECK_THROWS_AS(block->check_slots(block->memory_width(other), other, "test"), c10::ValueError);
  }
  REQUIRE(std::dynamic_pointer_cast<ConcatFusionImpl>(make_decoder_fusion(DecoderFusionType::concat, 5))->image_token_id == 5);
  CHECK_THROWS_AS(make_decoder_fusion(static_cast<DecoderFusionType>(7), 3), c10::ValueError);
}
