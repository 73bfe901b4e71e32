#include "helpers.h"
#include "vlmkit/data/tokenizer.h"
#include "vlmkit/generate/generate.h"
#include "vlmkit/generate/boxes.h"
#include "vlmkit/generate/json_schema.h"
#include "vlmkit/models/build.h"
#include "vlmkit/modules/vit.h"
#include "vlmkit/projectors/pixel_shuffle.h"
#include "vlmkit/train/trainer.h"

using namespace vlmkit;
using vlmkit::test::close;

namespace {
json tiny_generative(const char* projector, const char* fusion) {
  return {{"architecture", "encoder_decoder"},
          {"projector", {{"type", projector}}},
          {"fusion", fusion},
          {"image_encoder", {{"image_size", 32}, {"patch_size", 8}, {"d_model", 32}, {"depth", 1}}},
          {"decoder", {{"d_model", 32}, {"depth", 2}, {"num_heads", 4}, {"max_len", 96}}}};
}
}  // namespace

TEST_CASE("decoder: cached decoding equals full causal decoding", "[decoder][cache]") {
  torch::manual_seed(0);
  for (auto pos : {DecoderPosition::rotary, DecoderPosition::learned}) {
    TextDecoder decoder(TextDecoderOptions().d_model(32).depth(2).num_heads(4).pos_embedding(pos)
                            .cross_attention_every(2).context_dim(16));
    decoder->eval();
    auto x = torch::randn({2, 9, 32});
    auto ctx = torch::randn({2, 5, 16});
    auto full = decoder->forward(x, {}, {}, {}, ctx);
    DecoderCache cache = decoder->make_cache();
    std::vector<torch::Tensor> parts{decoder->forward(x.slice(1, 0, 5), {}, {}, {}, ctx, {}, &cache)};
    for (int64_t t = 5; t < 9; ++t) parts.push_back(decoder->forward(x.slice(1, t, t + 1), {}, {}, {}, ctx, {}, &cache));
    REQUIRE(close(torch::cat(parts, 1), full, 1e-5));
    CHECK_THROWS_AS(decoder->forward(x), c10::ValueError);  // cross-attention needs a context
  }
}

TEST_CASE("decoder: the fused decoding step equals the decoder's cached forward", "[decoder][cache][kernel]") {
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  std::vector<TextDecoderOptions> cases{
      TextDecoderOptions().d_model(32).depth(2).num_heads(4),
      TextDecoderOptions().d_model(32).depth(2).num_heads(4).pos_embedding(DecoderPosition::learned)
          .tie_embeddings(false),
      TextDecoderOptions().d_model(32).depth(2).num_heads(4).norm(NormType::rmsnorm).mlp(MlpType::swiglu)
          .num_kv_heads(2).qk_norm(true),
      TextDecoderOptions().d_model(32).depth(2).num_heads(4).cross_attention_every(1).context_dim(16)
          .gated_cross_attention(true)};
  for (auto& options : cases) {
    TextDecoder decoder(options);
    decoder->eval();
    for (auto& p : decoder->named_parameters())  // a gate of 0 would hide the cross-attention
      if (p.key().find("cross_gate") != std::string::npos) p.value().fill_(0.7);
    const bool cross = options.cross_attention_every() > 0;
    auto ctx = cross ? torch::randn({2, 5, 16}) : torch::Tensor();
    auto ctx_mask = cross ? torch::tensor({0, 0, 0, 1, 1}, torch::kBool).repeat({2, 1}) : torch::Tensor();
    // Row 1's first two prompt positions are padding (left-aligned prompts).
    auto prompt = torch::randn({2, 6, 32});
    auto pad = torch::zeros({2, 6}, torch::kBool);
    pad[1].slice(0, 0, 2).fill_(true);
    auto pos = torch::arange(6).repeat({2, 1});
    pos[1] = (pos[1] - 2).clamp_min(0);
    DecoderCache cache = decoder->make_cache();
    decoder->forward(prompt, pad, pos, torch::zeros({2, 6, 6}, torch::kBool), ctx, ctx_mask, &cache);
    std::vector<std::pair<torch::Tensor, torch::Tensor>> self_kv, cross_kv;
    for (const auto& layer : cache.layers) {
      self_kv.emplace_back(layer.self.key, layer.self.value);
      cross_kv.emplace_back(layer.cross.key, layer.cross.value);
    }
    kernels::FusedDecoder fused(vlmkit::detail::decode_weights(*decoder), self_kv, cache.padding_mask, cross_kv, ctx_mask, 10);
    auto next = pos.select(1, 5);
    for (int64_t t = 0; t < 4; ++t) {
      next = next + 1;
      auto ids = torch::randint(0, options.vocab_size(), {2}, torch::kLong);
      auto step_pad = torch::tensor({false, t == 2}, torch::kBool);  // row 1 feeds padding once
      auto want = decoder->logits(decoder->forward(decoder->token_embed->forward(ids.view({2, 1})),
                                                   step_pad.view({2, 1}), next.view({2, 1}), {}, ctx, ctx_mask,
                                                   &cache)).select(1, 0);
      auto got = fused.step(ids, step_pad, next);
      REQUIRE(close(got, want, 1e-4));
    }
    CHECK(fused.length() == 10);
    CHECK_THROWS_AS(fused.step(torch::zeros({2}, torch::kLong), torch::zeros({2}, torch::kBool), next + 1),
                    c10::ValueError);  // the cache is full
  }
  CHECK_THROWS_AS(set_decode_kernel("fast"), c10::ValueError);
}

TEST_CASE("encoder-decoder: templates compose concrete slot types", "[model][template]") {
  torch::manual_seed(0);
  auto vit = std::make_shared<ViTImpl>(ViTOptions().image_size(32).patch_size(8).d_model(32).depth(1));
  auto projector = std::make_shared<PixelShuffleProjectorImpl>(PixelShuffleProjectorOptions(32, 48));
  auto fusion = std::make_shared<ConcatFusionImpl>();
  auto decoder = std::make_shared<TextDecoderImpl>(TextDecoderOptions().d_model(48).depth(1).num_heads(4));
  EncoderDecoderImpl<ViTImpl, PixelShuffleProjectorImpl, ConcatFusionImpl, TextDecoderImpl> model(
      vit, projector, fusion, decoder);
  ByteTokenizer tokenizer;
  auto ids = torch::tensor(tokenizer.encode("<image>q: a", true, true)).unsqueeze(0);
  auto labels = ids.clone();
  labels.slice(1, 0, 4) = kIgnoreIndex;
  auto out = model.forward(torch::rand({1, 3, 32, 32}), ids, {}, labels);
  REQUIRE(out.logits.size(1) == ids.size(1) - 1 + 4);  // 16 patches / 4 after pixel shuffle
  REQUIRE(out.loss.defined());
  CHECK_THROWS_AS(model.forward(torch::rand({2, 3, 32, 32}), ids), c10::ValueError);
}

TEST_CASE("encoder-decoder: variable-size images in one padded batch equal each image alone", "[model][dynamic]") {
  torch::manual_seed(0);
  auto vit = std::make_shared<ViTImpl>(ViTOptions().image_size(32).patch_size(8).d_model(32).depth(2));
  auto projector = std::make_shared<PixelShuffleProjectorImpl>(PixelShuffleProjectorOptions(32, 48));
  for (auto [concat, positions] : {std::pair{true, ImagePositions::none}, std::pair{false, ImagePositions::none},
                                   std::pair{true, ImagePositions::sincos2d},
                                   std::pair{false, ImagePositions::sincos2d}}) {
    std::shared_ptr<DecoderFusionModule> fusion;
    if (concat) fusion = std::make_shared<ConcatFusionImpl>();
    else fusion = std::make_shared<CrossAttentionDecoderFusionImpl>();
    auto dec = std::make_shared<TextDecoderImpl>(
        TextDecoderOptions().d_model(48).depth(1).num_heads(4).cross_attention_every(concat ? 0 : 1).context_dim(48));
    EncoderDecoderImpl<ViTImpl, PixelShuffleProjectorImpl> model(vit, projector, fusion, dec,
                                                                 GenerativeOptions().image_positions(positions));
    model.eval();
    ByteTokenizer tokenizer;
    auto prompt = tokenizer.encode("<image>Size?", true);
    auto ids = torch::tensor(prompt).unsqueeze(0);
    auto wide = torch::rand({1, 3, 16, 48}), tall = torch::rand({1, 3, 32, 16});
    auto images = torch::zeros({2, 3, 32, 48});
    images.slice(0, 0, 1).slice(2, 0, 16).copy_(wide);
    images.slice(0, 1, 2).slice(3, 0, 16).copy_(tall);
    auto sizes = torch::tensor({16, 48, 32, 16}, torch::kLong).view({2, 2});
    INFO((concat ? "concat" : "cross_attention") << ", image_positions " << to_name(positions));
    auto batched = model.forward(images, ids.repeat({2, 1}), {}, {}, sizes);
    auto [memory, mask] = model.encode_images(images, sizes);
    REQUIRE(mask.defined());
    REQUIRE(mask.logical_not().sum(1).equal(torch::tensor({3, 2}, torch::kLong)));  // (2x6)/4 and (4x2)/4 tokens
    int64_t i = 0;
    for (const auto& image : {wide, tall}) {
      auto alone = model.forward(image, ids);
      const int64_t n = alone.logits.size(1);
      REQUIRE(close(batched.logits[i].slice(0, 0, n), alone.logits[0], 2e-5));
      auto g = model.generate(image, {prompt}, GenerationOptions().max_new_tokens(4));
      auto gb = model.generate(images, {prompt, prompt}, GenerationOptions().max_new_tokens(4), nullptr, nullptr, sizes);
      REQUIRE(gb.tokens[size_t(i)] == g.tokens[0]);
      ++i;
    }
  }
}

TEST_CASE("encoder-decoder: sincos2d image positions mark each projected token's cell", "[model][positions]") {
  torch::manual_seed(0);
  for (const char* fusion : {"cross_attention", "concat"}) {
    auto config = tiny_generative("pixel_shuffle", fusion);
    auto a = make_encoder_decoder(config);
    config["image_positions"] = "sincos2d";
    auto b = make_encoder_decoder(config);
    REQUIRE(b->config()["image_positions"] == "sincos2d");
    REQUIRE(a->config()["image_positions"] == "none");
    // No parameters of their own: the same weights load into both.
    torch::NoGradGuard no_grad;
    for (const auto& item : a->named_parameters()) b->named_parameters()[item.key()].copy_(item.value());
    auto images = torch::rand({2, 3, 32, 32});
    // 32 px / patch 8 = a 4x4 grid; pixel shuffle (factor 2) leaves 2x2 cells, row-major.
    auto added = b->encode_images(images) - a->encode_images(images);
    REQUIRE(close(added, vlmkit::detail::sincos_2d(2, 2, 32).unsqueeze(0).expand({2, 4, 32}), 1e-5));
    REQUIRE_FALSE(close(added[0][1], added[0][2], 1e-2));  // (0, 1) and (1, 0) differ
  }
  // gated_sincos2d: the same table times a learned per-channel gate that starts at zero.
  auto config = tiny_generative("pixel_shuffle", "cross_attention");
  auto a = make_encoder_decoder(config);
  config["image_positions"] = "gated_sincos2d";
  auto gated = make_encoder_decoder(config);
  REQUIRE(gated->parameters().size() == a->parameters().size() + 1);
  auto gate = gated->named_parameters()["image_position_gate"];
  REQUIRE(gate.sizes() == torch::IntArrayRef{32});
  REQUIRE(gate.abs().sum().item<float>() == 0);
  {
    torch::NoGradGuard no_grad;
    for (const auto& item : a->named_parameters()) gated->named_parameters()[item.key()].copy_(item.value());
    auto images = torch::rand({1, 3, 32, 32});
    REQUIRE(close(gated->encode_images(images), a->encode_images(images), 1e-6));  // closed at the start
    gate.copy_(torch::linspace(0, 1, 32));
    REQUIRE(close(gated->encode_images(images) - a->encode_images(images),
                  (vlmkit::detail::sincos_2d(2, 2, 32) * torch::linspace(0, 1, 32)).unsqueeze(0), 1e-5));
  }
  // The gate learns: it has a gradient while closed.
  auto images = torch::rand({2, 3, 32, 32});
  ByteTokenizer tokenizer;
  auto ids = torch::tensor(tokenizer.encode("<image>Where?", true)).unsqueeze(0).repeat({2, 1});
  gated->forward(images, ids, {}, ids).loss.backward();
  REQUIRE(gate.grad().defined());
  REQUIRE(gate.grad().abs().sum().item<float>() > 0);
  // Only projectors whose tokens lie on a grid, and only the encoder-decoder.
  config = tiny_generative("resampler", "cross_attention");
  config["image_positions"] = "sincos2d";
  REQUIRE_THROWS_WITH(make_encoder_decoder(config), Catch::Contains("on a grid"));
  auto joint = json{{"architecture", "encoder_text_decoder"}, {"image_positions", "sincos2d"}};
  REQUIRE_THROWS_WITH(make_encoder_text_decoder(joint), Catch::Contains("image_positions is an encoder_decoder"));
  config = tiny_generative("pixel_shuffle", "cross_attention");
  config["image_positions"] = "learned";
  REQUIRE_THROWS_WITH(make_encoder_decoder(config), Catch::Contains("sincos2d"));
}

TEST_CASE("json schema: matcher follows the schema", "[json]") {
  auto schema = ordered_json::parse(R"({"type":"object","properties":{
      "name":{"type":"string","maxLength":3},"n":{"type":"integer","minimum":0,"maximum":50},
      "ok":{"type":"boolean"},"tags":{"type":"array","items":{"enum":["a","bc"]},"maxItems":2}}})");
  JsonSchemaMatcher m(schema);
  REQUIRE(m.feed(R"({"name":"abc","n":42,"ok":true,"tags":["bc","a"]})"));
  REQUIRE(m.can_finish());
  JsonSchemaMatcher too_long(schema);
  REQUIRE_FALSE(too_long.feed(R"({"name":"abcd")"));
  JsonSchemaMatcher too_big(schema);
  REQUIRE(too_big.feed(R"({"name":"","n":5)"));
  REQUIRE_FALSE(too_big.feed('1'));  // 51 > maximum
  REQUIRE(too_big.feed(','));
  JsonSchemaMatcher three_tags(schema);
  REQUIRE(three_tags.feed(R"({"name":"","n":0,"ok":false,"tags":["a","a")"));
  REQUIRE_FALSE(three_tags.feed(','));
  CHECK_THROWS_AS(JsonSchemaMatcher(ordered_json::parse(R"({"type":"tuple"})")), c10::ValueError);
}

TEST_CASE("json schema: arrays of objects (records)", "[json]") {
  // An array whose items are objects, inside an object, inside an array: the
  // matcher used to refuse the '{' that opens an object item.
  auto schema = ordered_json::parse(R"({"type":"object","properties":{"Objects":{"type":"array","maxItems":2,
      "items":{"type":"object","properties":{"Object":{"type":"string","maxLength":8},
      "Box":{"type":"array","minItems":2,"maxItems":2,"items":{"type":"integer","minimum":0,"maximum":99}}}}}}})");
  JsonSchemaMatcher m(schema);
  REQUIRE(m.feed(R"({"Objects":[{"Object":"a b","Box":[1,20]},{"Object":"","Box":[99,0]}]})"));
  REQUIRE(m.can_finish());
  JsonSchemaMatcher empty(schema);
  REQUIRE(empty.feed(R"({"Objects":[]})"));
  REQUIRE(empty.can_finish());
  JsonSchemaMatcher wrong_key(schema);
  REQUIRE_FALSE(wrong_key.feed(R"({"Objects":[{"Box")"));  // properties in schema order
  JsonSchemaMatcher three(schema);
  REQUIRE(three.feed(R"({"Objects":[{"Object":"","Box":[1,2]},{"Object":"","Box":[1,2]})"));
  REQUIRE_FALSE(three.feed(','));  // maxItems 2
  JsonSchemaMatcher open(schema);
  REQUIRE(open.feed(R"({"Objects":[{"Object":"x")"));
  REQUIRE_FALSE(open.can_finish());
  // The budget the constraint steers by covers the nested records.
  REQUIRE(JsonSchemaMatcher::max_length(schema) >= int64_t(std::string(R"({"Objects":[{"Object":"12345678","Box":[99,99]},{"Object":"12345678","Box":[99,99]}]})").size()));
}

TEST_CASE("json schema: strings take JSON escapes, each one character long", "[json]") {
  auto schema = ordered_json::parse(R"({"type":"string","maxLength":5})");
  JsonSchemaMatcher quoted(schema);
  REQUIRE(quoted.feed(R"("a \"b\"")"));  // a "b" : 5 characters
  REQUIRE(quoted.can_finish());
  REQUIRE(ordered_json::parse(R"("a \"b\"")").get<std::string>().size() == 5);
  JsonSchemaMatcher every(ordered_json::parse(R"({"type":"string","maxLength":8})"));
  REQUIRE(every.feed(R"("\\\/\b\f\n\r\t\"")"));
  REQUIRE(every.can_finish());
  JsonSchemaMatcher over(schema);
  REQUIRE(over.feed(R"("abcde)"));
  REQUIRE_FALSE(over.feed('\\'));  // a sixth character, escaped or not
  JsonSchemaMatcher bad(schema);
  REQUIRE(bad.feed(R"("a\)"));
  REQUIRE_FALSE(bad.feed('x'));   // not an escape JSON has
  REQUIRE_FALSE(bad.feed('u'));   // no unicode escapes: values are printable ASCII
  REQUIRE_FALSE(bad.can_finish());
  REQUIRE(bad.feed("n\""));  // the state a refused character left is the one before it
  REQUIRE(bad.can_finish());
  // The longest value grows with the escapes it may hold.
  REQUIRE(JsonSchemaMatcher::max_length(schema) == 2 + 2 * 5);
}

TEST_CASE("boxes: normalised text round trip", "[boxes]") {
  Box box{10, 20, 110, 220};
  auto text = box_to_text(box, 640, 480);
  REQUIRE(text == "[16,42,172,458]");
  auto boxes = parse_boxes("the cat " + text + " and [1,2,3]", 640, 480);
  REQUIRE(boxes.size() == 1);
  REQUIRE(boxes[0].x2 == Approx(110).margin(640.0 / 999));
}

TEST_CASE("tokenizer: bytes round-trip and <image> is one token", "[tokenizer]") {
  ByteTokenizer t;
  const std::string text = "caf\xc3\xa9 <image> \xff\x01";
  auto ids = t.encode(text, true, true);
  REQUIRE(ids.front() == t.special().bos);
  REQUIRE(ids.back() == t.special().eos);
  REQUIRE(std::count(ids.begin(), ids.end(), t.special().image) == 1);
  REQUIRE(t.decode(ids, false) == "<bos>" + text + "<eos>");
  CHECK_THROWS_AS(t.decode({999}), c10::IndexError);
}

TEST_CASE("encoder-decoder: packed rows give the loss and gradients of one example per row", "[model][packing]") {
  ByteTokenizer tokenizer;
  const std::vector<std::pair<std::string, std::string>> examples{
      {"<image>What colour?", "red"}, {"<image>Describe", "a blue circle"}, {"<image>Count", "3"}};
  auto encode = [&](size_t i) {
    auto prompt = tokenizer.encode(examples[i].first, true);
    auto answer = tokenizer.encode(examples[i].second, false, true);
    std::vector<int64_t> ids = prompt, labels(prompt.size(), kIgnoreIndex);
    ids.insert(ids.end(), answer.begin(), answer.end());
    labels.insert(labels.end(), answer.begin(), answer.end());
    return std::make_pair(ids, labels);
  };
  // rows: unpacked {0}, {1}, {2}; packed {0, 2}, {1}
  auto batch_of = [&](const std::vector<std::vector<size_t>>& rows) {
    size_t width = 0;
    for (const auto& row : rows) {
      size_t n = 0;
      for (size_t i : row) n += encode(i).first.size();
      width = std::max(width, n);
    }
    const auto b = int64_t(rows.size()), t = int64_t(width);
    Batch batch;
    batch.input_ids = torch::zeros({b, t}, torch::kLong);
    batch.labels = torch::full({b, t}, kIgnoreIndex, torch::kLong);
    batch.padding_mask = torch::ones({b, t}, torch::kBool);
    batch.segment_ids = torch::full({b, t}, -1, torch::kLong);
    for (int64_t r = 0; r < b; ++r) {
      int64_t at = 0, s = 0;
      for (size_t i : rows[size_t(r)]) {
        auto [ids, labels] = encode(i);
        const auto n = int64_t(ids.size());
        batch.input_ids[r].slice(0, at, at + n).copy_(torch::tensor(ids));
        batch.labels[r].slice(0, at, at + n).copy_(torch::tensor(labels));
        batch.padding_mask[r].slice(0, at, at + n).fill_(false);
        batch.segment_ids[r].slice(0, at, at + n).fill_(s++);
        at += n;
      }
    }
    return batch;
  };
  auto images = torch::rand({3, 3, 32, 32});
  for (const char* fusion : {"concat", "cross_attention"})
    for (const char* attention : {"causal", "prefix_lm"})
      for (const char* reduction : {"sample", "sqrt"}) {
        INFO(fusion << " + " << attention << " + " << reduction);
        torch::manual_seed(0);
        auto config = tiny_generative("pixel_shuffle", fusion);
        config["attention"] = attention;
        config["loss_reduction"] = reduction;
        auto model = make_encoder_decoder(config);
        auto loss_and_grads = [&](const std::vector<std::vector<size_t>>& rows, bool segments) {
          auto batch = batch_of(rows);
          if (!segments) batch.segment_ids = torch::Tensor();
          std::vector<int64_t> order;
          for (const auto& row : rows) order.insert(order.end(), row.begin(), row.end());
          batch.images = images.index_select(0, torch::tensor(order));
          model->zero_grad();
          auto loss = generative_loss(*model, batch);
          loss.backward();
          std::vector<torch::Tensor> grads;
          for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
          return std::make_pair(loss.item<double>(), grads);
        };
        auto [loss, grads] = loss_and_grads({{0}, {1}, {2}}, false);
        auto [packed, packed_grads] = loss_and_grads({{0, 2}, {1}}, true);
        REQUIRE(std::abs(packed - loss) < 1e-5);
        if (std::string(fusion) == "concat") {  // the same rows read without segment ids differ
          auto mixed = loss_and_grads({{0, 2}, {1}}, false).first;
          REQUIRE(std::abs(mixed - loss) > 1e-4);
        }
        for (size_t i = 0; i < grads.size(); ++i) REQUIRE(close(packed_grads[i], grads[i], 1e-5));
      }
}
