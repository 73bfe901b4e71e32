// Composes an encoder-decoder VLM at compile time (ViT + pixel-shuffle
// projector + concat fusion + rotary decoder), teaches it one answer, and
// generates it: greedy, beam search, and JSON-constrained.
//
//   ./example_encoder_decoder
#include <torch/torch.h>
#include <vlmkit/projectors/pixel_shuffle.h>
#include <vlmkit/vlmkit.h>

#include <iostream>

int main() {
  using namespace vlmkit;
  apply_default_threads();
  apply_default_allocator();
  torch::manual_seed(0);
  using Model = EncoderDecoderImpl<ViTImpl, PixelShuffleProjectorImpl, ConcatFusionImpl, TextDecoderImpl>;
  auto model = std::make_shared<Model>(
      std::make_shared<ViTImpl>(ViTOptions().image_size(32).patch_size(8).d_model(64).depth(2)),
      std::make_shared<PixelShuffleProjectorImpl>(PixelShuffleProjectorOptions(64, 64).factor(2)),
      std::make_shared<ConcatFusionImpl>(),
      std::make_shared<TextDecoderImpl>(TextDecoderOptions().d_model(64).depth(2).max_len(128)));

  ByteTokenizer tokenizer;
  const std::string prompt = "<image>What is in the picture?";
  const std::string answer = "a red square";
  auto prompt_ids = tokenizer.encode(prompt);
  auto answer_ids = tokenizer.encode(answer, /*add_bos=*/false, /*add_eos=*/true);
  std::vector<int64_t> ids = prompt_ids;
  ids.insert(ids.end(), answer_ids.begin(), answer_ids.end());
  auto input = torch::tensor(ids).unsqueeze(0);
  auto labels = input.clone();
  labels.slice(1, 0, int64_t(prompt_ids.size())) = kIgnoreIndex;

  auto image = torch::zeros({1, 3, 32, 32});
  image.select(1, 0).slice(1, 8, 24).slice(2, 8, 24) = 1.0;  // a red square
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(3e-3));
  for (int step = 0; step < 100; ++step) {
    auto loss = model->forward(image, input, {}, labels).loss;
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    if (step % 25 == 0) std::cout << "step " << step << " loss " << loss.item<double>() << "\n";
  }
  model->eval();
  auto greedy = model->generate(image, {prompt_ids}, GenerationOptions().max_new_tokens(20));
  auto beams = model->generate(image, {prompt_ids}, GenerationOptions().max_new_tokens(20).num_beams(3));
  std::cout << "greedy: " << tokenizer.decode(greedy.tokens[0]) << "\n";
  std::cout << "beam:   " << tokenizer.decode(beams.tokens[0]) << "\n";

  auto schema = ordered_json::parse(R"({"type":"object","properties":{"Colour":{"type":"string"}}})");
  auto texts = std::make_shared<std::vector<std::string>>();
  for (int64_t v = 0; v < tokenizer.vocab_size(); ++v) texts->push_back(tokenizer.token_text(v));
  auto constrained = model->generate(image, {prompt_ids}, GenerationOptions().max_new_tokens(64), [&] {
    return std::make_unique<JsonSchemaConstraint>(schema, texts, tokenizer.special().eos);
  });
  const auto json_text = tokenizer.decode(constrained.tokens[0]);
  std::cout << "json:   " << json_text << "\n";
  const bool ok = tokenizer.decode(greedy.tokens[0]) == answer && nlohmann::json::accept(json_text);
  return ok ? 0 : 1;
}
