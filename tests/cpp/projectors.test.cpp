// The projector slot. The generic tests iterate the registry, so they cover
// every registered projector (the throwaway test_strided one included) without
// an edit; the behaviour tests below them are each projector's own.
#include "helpers.h"
#include "vlmkit/data/tokenizer.h"
#include "vlmkit/models/build.h"
#include "vlmkit/projectors/linear.h"
#include "vlmkit/projectors/mlp.h"
#include "vlmkit/projectors/patch_merger.h"
#include "vlmkit/projectors/pixel_shuffle.h"
#include "vlmkit/projectors/resampler.h"

using namespace vlmkit;
using vlmkit::test::close;

namespace {
EncoderOutput grid_tokens(int64_t batch, int64_t rows, int64_t cols, int64_t dim) {
  EncoderOutput image;
  image.tokens = torch::randn({batch, rows * cols, dim});
  image.pooled = torch::randn({batch, dim});
  image.grid = {rows, cols};
  return image;
}
}  // namespace

TEST_CASE("projector registry: rows are sorted, named and documented", "[projector][registry]") {
  const auto& rows = projector_registry().rows();
  REQUIRE(rows.size() >= 6);  // five built in, one test_strided
  for (size_t i = 0; i < rows.size(); ++i) {
    INFO(rows[i].name);
    if (i) REQUIRE(rows[i - 1].name < rows[i].name);
    REQUIRE(!rows[i].python_class.empty());
    REQUIRE(!rows[i].doc.empty());
    REQUIRE(rows[i].defaults.is_object());
  }
  REQUIRE(projector_registry().find("test_strided") != nullptr);
  CHECK_THROWS_WITH(make_projector(json{{"type", "qformer"}}, 16, 24),
                    Catch::Contains("config key 'projector.type': unknown projector 'qformer'; expected one of 'linear'"));
  CHECK_THROWS_AS(make_projector(json{{"type", 3}}, 16, 24), c10::TypeError);
  CHECK_THROWS_WITH(projector_registry().add(slot_row<MlpProjectorImpl, ProjectorModule>("Again", "again", int64_t{1}, int64_t{1})),
                    Catch::Contains("projector 'mlp' is registered twice"));
  REQUIRE(make_projector(json(), 16, 24)->config()["type"] == "mlp");  // the default
}

TEST_CASE("projectors (generic): contract, config round trip, state dict, gradients, bad input",
          "[projector][generic]") {
  for (const auto& row : projector_registry().rows()) {
    INFO("projector " << row.name);
    torch::manual_seed(0);
    auto p = make_projector(json{{"type", row.name}}, 16, 24);
    auto image = grid_tokens(2, 8, 8, 16);
    auto out = p->forward(image);
    REQUIRE(out.sizes() == torch::IntArrayRef({2, p->num_output_tokens(8, 8), 24}));
    REQUIRE(p->input_dim() == 16);
    REQUIRE(p->output_dim() == 24);

    // config(): the type and exactly the row's fields, at their defaults; it rebuilds the projector.
    auto config = p->config();
    REQUIRE(config["type"] == row.name);
    auto fields = config;
    fields.erase("type");
    REQUIRE(fields == row.defaults);
    auto copy = make_projector(config, 16, 24);
    REQUIRE(copy->config() == config);
    // Same parameter names and shapes; loading the weights gives the same output.
    auto own = p->named_parameters(), theirs = copy->named_parameters();
    REQUIRE(own.size() == theirs.size());
    {
      torch::NoGradGuard no_grad;
      for (const auto& item : own) {
        REQUIRE(theirs.contains(item.key()));
        REQUIRE(theirs[item.key()].sizes() == item.value().sizes());
        theirs[item.key()].copy_(item.value());
      }
    }
    REQUIRE(close(copy->forward(image), out, 1e-6));

    // Gradients reach every parameter.
    out.pow(2).sum().backward();
    vlmkit::test::require_all_grads(*p);

    // Padding masks: undefined in, undefined out; else one flag per output token.
    auto padded = image;
    padded.padding_mask = torch::zeros({2, 64}, torch::kBool);
    auto mask = p->output_padding_mask(padded);
    if (mask.defined()) REQUIRE(mask.sizes() == torch::IntArrayRef({2, out.size(1)}));
    REQUIRE(!p->output_padding_mask(image).defined());

    // Hostile inputs raise ValueError naming what was expected.
    CHECK_THROWS_WITH(p->forward(grid_tokens(2, 8, 8, 8)), Catch::Contains("expected image tokens of shape [B, N, 16]"));
    EncoderOutput flat;
    flat.tokens = torch::randn({64, 16});
    CHECK_THROWS_AS(p->forward(flat), c10::ValueError);
    CHECK_THROWS_AS(make_projector(json{{"type", row.name}}, 0, 24), c10::ValueError);
    CHECK_THROWS_WITH(make_projector(json{{"type", row.name}, {"bogus", 1}}, 16, 24),
                      Catch::Contains("unknown config key 'projector.bogus'"));
  }
}

TEST_CASE("projectors (generic): in every model, cached generation equals uncached, with beams too",
          "[projector][generic][generate]") {
  ByteTokenizer tokenizer;
  for (const auto& name : projector_registry().names())
    for (const auto& fusion : enum_names<DecoderFusionType>()) {
      INFO(name << " + " << fusion);
      torch::manual_seed(0);
      auto model = make_encoder_decoder({{"architecture", "encoder_decoder"},
                                         {"projector", {{"type", name}}},
                                         {"fusion", fusion},
                                         {"image_encoder", {{"image_size", 32}, {"patch_size", 8}, {"d_model", 32}, {"depth", 1}}},
                                         {"decoder", {{"d_model", 32}, {"depth", 2}, {"num_heads", 4}, {"max_len", 96}}}});
      model->eval();
      auto images = torch::rand({2, 3, 32, 32});
      std::vector<std::vector<int64_t>> prompts{tokenizer.encode("<image>What?"), tokenizer.encode("<image>Hi")};
      for (int64_t beams : {1, 3}) {
        auto a = model->generate(images, prompts, GenerationOptions().max_new_tokens(6).num_beams(beams));
        auto b = model->generate(images, prompts,
                                 GenerationOptions().max_new_tokens(6).num_beams(beams).use_cache(false));
        REQUIRE(a.tokens == b.tokens);
      }
      REQUIRE(model_config(*model)["projector"]["type"] == name);
    }
}

// ---------------------------------------------------------------- each projector's own behaviour
TEST_CASE("linear: one Linear per token", "[projector]") {
  LinearProjector p(LinearProjectorOptions(16, 24));
  auto image = grid_tokens(2, 8, 8, 16);
  REQUIRE(p->named_parameters().size() == 2);
  REQUIRE(close(p->forward(image), torch::nn::functional::linear(image.tokens, p->fc1->weight, p->fc1->bias)));
}

TEST_CASE("mlp: hidden_dim sets the hidden width (0 = out_dim)", "[projector]") {
  REQUIRE(MlpProjector(MlpProjectorOptions(16, 24))->fc1->weight.size(0) == 24);
  MlpProjector wide(MlpProjectorOptions(16, 24).hidden_dim(40));
  REQUIRE(wide->fc1->weight.size(0) == 40);
  REQUIRE(wide->forward(grid_tokens(2, 8, 8, 16)).sizes() == torch::IntArrayRef({2, 64, 24}));
  CHECK_THROWS_AS(MlpProjector(MlpProjectorOptions(16, 24).hidden_dim(-1)), c10::ValueError);
}

TEST_CASE("pixel_shuffle: r^2 fewer tokens; grids must divide by r", "[projector]") {
  for (int64_t r : {1, 2, 4}) {
    PixelShuffleProjector p(PixelShuffleProjectorOptions(16, 24).factor(r));
    REQUIRE(p->forward(grid_tokens(2, 8, 8, 16)).size(1) == 64 / (r * r));
    REQUIRE(p->num_output_tokens(8, 8) == 64 / (r * r));
  }
  PixelShuffleProjector three(PixelShuffleProjectorOptions(16, 24).factor(3));
  CHECK_THROWS_WITH(three->forward(grid_tokens(1, 4, 4, 16)), Catch::Contains("grid 4x4 must be divisible by 3"));
  CHECK_THROWS_AS(PixelShuffleProjector(PixelShuffleProjectorOptions(16, 24).factor(0)), c10::ValueError);
  // A merged token is padding only when its whole block is.
  PixelShuffleProjector p(PixelShuffleProjectorOptions(16, 24));
  auto image = grid_tokens(1, 4, 4, 16);
  image.padding_mask = torch::zeros({1, 4, 4}, torch::kBool);
  image.padding_mask.slice(2, 2, 4) = true;  // the right half
  image.padding_mask = image.padding_mask.reshape({1, 16});
  REQUIRE(torch::equal(p->output_padding_mask(image), torch::tensor({false, true, false, true}).view({1, 4})));
  image.padding_mask[0][3] = false;  // a block half padded
  CHECK_THROWS_AS(p->output_padding_mask(image), c10::ValueError);
}

TEST_CASE("patch_merger: a quarter of the tokens, normalised before merging", "[projector]") {
  PatchMergerProjector p(PatchMergerProjectorOptions(16, 24));
  REQUIRE(p->forward(grid_tokens(2, 8, 6, 16)).size(1) == 12);
  CHECK_THROWS_AS(p->forward(grid_tokens(2, 5, 4, 16)), c10::ValueError);
  // LayerNorm first: scaling the input does not change the output.
  auto image = grid_tokens(1, 4, 4, 16);
  auto scaled = image;
  scaled.tokens = image.tokens * 7.0;
  REQUIRE(close(p->forward(image), p->forward(scaled), 1e-4));
}

TEST_CASE("resampler: num_queries tokens whatever the image size; padding masked out", "[projector]") {
  torch::manual_seed(0);
  ResamplerProjector p(ResamplerProjectorOptions(16, 24).num_queries(5).num_heads(4));
  p->eval();
  REQUIRE(p->forward(grid_tokens(2, 8, 8, 16)).sizes() == torch::IntArrayRef({2, 5, 24}));
  REQUIRE(p->forward(grid_tokens(1, 16, 16, 16)).sizes() == torch::IntArrayRef({1, 5, 24}));
  REQUIRE(!p->output_padding_mask(grid_tokens(1, 2, 2, 16)).defined());
  // Padded tokens do not change the output.
  auto image = grid_tokens(1, 2, 2, 16);
  auto padded = image;
  padded.tokens = torch::cat({image.tokens, torch::randn({1, 4, 16})}, 1);
  padded.grid = {4, 2};
  padded.padding_mask = torch::tensor({false, false, false, false, true, true, true, true}).view({1, 8});
  REQUIRE(close(p->forward(image), p->forward(padded), 1e-5));
  CHECK_THROWS_AS(ResamplerProjector(ResamplerProjectorOptions(16, 24).num_heads(5)), c10::ValueError);
  CHECK_THROWS_AS(ResamplerProjector(ResamplerProjectorOptions(16, 24).num_heads(0)), c10::ValueError);
}
