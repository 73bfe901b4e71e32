// Checkpoint format and the Trainer.
#include <ATen/autocast_mode.h>

#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "vlmkit/kernels/gemm.h"
#include "vlmkit/models/build.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/lora.h"
#include "vlmkit/modules/linear.h"
#include "vlmkit/train/trainer.h"

namespace fs = std::filesystem;
using vlmkit::test::close;

namespace {

fs::path scratch(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("vlmkit_train_test_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
}

vlmkit::json tiny_config() {
  return {{"architecture", "encoder_decoder"},
          {"image_encoder", {{"type", "vit"}, {"image_size", 16}, {"patch_size", 8}, {"d_model", 16},
                             {"depth", 1}, {"num_heads", 2}}},
          {"projector", {{"type", "mlp"}}},
          {"decoder", {{"d_model", 16}, {"depth", 1}, {"num_heads", 2}, {"max_len", 64}}}};
}

/// Fixed batches: a deterministic stand-in for the Loader.
class FixedBatches : public vlmkit::BatchSource {
 public:
  explicit FixedBatches(int64_t n) {
    auto gen = torch::make_generator<at::CPUGeneratorImpl>(7);
    for (int64_t i = 0; i < n; ++i) {
      vlmkit::Batch b;
      b.images = torch::randn({2, 3, 16, 16}, gen);
      b.input_ids = torch::randint(8, 200, {2, 10}, gen);
      b.input_ids.select(1, 1).fill_(3);  // the <image> placeholder
      b.labels = b.input_ids.clone();
      b.labels.slice(1, 0, 4).fill_(-100);
      b.padding_mask = torch::zeros({2, 10}, torch::kBool);
      b.indices = torch::arange(2);
      batches_.push_back(b);
    }
  }
  void start_epoch(int64_t epoch, int64_t first) override {
    epoch_ = epoch;
    next_ = first;
  }
  std::optional<vlmkit::Batch> next() override {
    if (next_ >= int64_t(batches_.size())) return std::nullopt;
    // Epochs differ: batch k of epoch e is fixed batch (k + e) mod n.
    return batches_[size_t((next_++ + epoch_) % int64_t(batches_.size()))];
  }
  int64_t num_batches() const override { return int64_t(batches_.size()); }

 private:
  std::vector<vlmkit::Batch> batches_;
  int64_t epoch_ = 0, next_ = 0;
};

}  // namespace

TEST_CASE("safetensors: every dtype round-trips with metadata", "[checkpoint]") {
  auto dir = scratch("safetensors");
  vlmkit::TensorMap in = {{"f32", torch::randn({3, 4})},
                          {"f64", torch::randn({2}, torch::kDouble)},
                          {"bf16", torch::randn({5}).to(torch::kBFloat16)},
                          {"f16", torch::randn({1, 2}).to(torch::kHalf)},
                          {"i64", torch::arange(6).view({2, 3})},
                          {"u8", torch::randint(0, 255, {7}).to(torch::kUInt8)},
                          {"bool", torch::tensor({true, false, true})},
                          {"scalar", torch::tensor(3.5)},
                          {"empty", torch::zeros({0, 3})},
                          {"strided", torch::randn({4, 4}).t()}};
  vlmkit::save_safetensors((dir / "a.safetensors").string(), in, {{"format", "pt"}});
  auto [out, meta] = vlmkit::load_safetensors((dir / "a.safetensors").string());
  REQUIRE(meta.at("format") == "pt");
  REQUIRE(out.size() == in.size());
  for (const auto& [k, v] : in) {
    INFO(k);
    REQUIRE(out.at(k).dtype() == v.dtype());
    REQUIRE(out.at(k).sizes() == v.sizes());
    REQUIRE(torch::equal(out.at(k), v));
  }
  // The header is 8-byte aligned, as the format recommends.
  auto bytes = slurp(dir / "a.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  REQUIRE(n % 8 == 0);
}

TEST_CASE("safetensors: malformed files raise ValueError naming the problem", "[checkpoint][hostile]") {
  vlmkit::TensorMap in = {{"w", torch::randn({4, 4})}};
  auto dir = scratch("bad_safetensors");
  vlmkit::save_safetensors((dir / "w.safetensors").string(), in);
  const auto good = slurp(dir / "w.safetensors");
  auto parse = [](const std::string& bytes) { return vlmkit::parse_safetensors(bytes, "test"); };
  REQUIRE_THROWS_WITH(parse(""), Catch::Contains("not a safetensors file"));
  REQUIRE_THROWS_WITH(parse(good.substr(0, 20)), Catch::Contains("does not fit"));
  REQUIRE_THROWS_WITH(parse(good.substr(0, good.size() - 4)), Catch::Contains("do not match shape"));
  std::string huge = good;
  huge[7] = char(0x7f);
  REQUIRE_THROWS_WITH(parse(huge), Catch::Contains("header length"));
  auto with_header = [](const std::string& header) {
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[size_t(i)] = char((header.size() >> (8 * i)) & 0xff);
    return out + header + std::string(64, '\0');
  };
  REQUIRE_THROWS_WITH(parse(with_header("{not json")), Catch::Contains("not valid JSON"));
  REQUIRE_THROWS_WITH(parse(with_header("[1]")), Catch::Contains("must be a JSON object"));
  REQUIRE_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"Q8","shape":[1],"data_offsets":[0,1]}})")),
                      Catch::Contains("unsupported dtype 'Q8'"));
  REQUIRE_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})")),
                      Catch::Contains("non-negative"));
  REQUIRE_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,4]}})")),
                      Catch::Contains("data_offsets"));
  REQUIRE_THROWS_WITH(
      parse(with_header(R"({"w":{"dtype":"F32","shape":[1000000000,1000000000],"data_offsets":[0,4]}})")),
      Catch::Contains("larger than the file"));
  REQUIRE_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"F32"}})")), Catch::Contains("expected an object"));
  REQUIRE_THROWS_WITH(parse(with_header(R"({"__metadata__":{"a":1}})")), Catch::Contains("must be a string"));
  REQUIRE_THROWS_AS(parse(with_header("{not json")), c10::ValueError);
}

TEST_CASE("checkpoints: atomic commit, latest pointer, checksums, pruning", "[checkpoint]") {
  auto root = scratch("ckpt");
  auto write = [&](const std::string& name, double value) {
    vlmkit::CheckpointWriter w(root.string(), name);
    w.add_json("trainer.json", {{"value", value}});
    w.add_tensors("model.safetensors", {{"w", torch::full({2}, value)}});
    return w.commit();
  };
  write("step-00000001", 1.0);
  write("step-00000002", 2.0);
  REQUIRE(vlmkit::latest_checkpoint(root.string()) == (root / "step-00000002").string());
  {
    // A writer that never commits (a crash mid-write) changes nothing visible.
    vlmkit::CheckpointWriter w(root.string(), "step-00000003");
    w.add_json("trainer.json", {{"value", 3.0}});
  }
  REQUIRE(vlmkit::latest_checkpoint(root.string()) == (root / "step-00000002").string());
  vlmkit::Checkpoint c(root.string());
  REQUIRE(c.read_json("trainer.json")["value"].get<double>() == 2.0);
  REQUIRE(c.read_tensors("model.safetensors").at("w")[0].item<double>() == 2.0);

  // A changed byte fails the checksum with a clear error.
  auto model_file = root / "step-00000002" / "model.safetensors";
  auto bytes = slurp(model_file);
  bytes.back() ^= 1;
  spit(model_file, bytes);
  REQUIRE_THROWS_WITH(c.read_tensors("model.safetensors"), Catch::Contains("SHA-256"));
  // Without a usable `latest`, the newest checkpoint that verifies is chosen.
  fs::remove(root / "latest");
  REQUIRE(vlmkit::latest_checkpoint(root.string()) == (root / "step-00000001").string());
  // Nothing there: NotFound (Python FileNotFoundError).
  REQUIRE_THROWS_AS(vlmkit::Checkpoint((root / "nothing").string()), vlmkit::NotFound);

  write("step-00000004", 4.0);
  write("step-00000005", 5.0);
  vlmkit::prune_checkpoints(root.string(), 2);
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory()) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  REQUIRE(left == std::vector<std::string>{"step-00000004", "step-00000005"});
}

TEST_CASE("models: save_model/load_model give identical logits; wrong architecture is refused", "[checkpoint]") {
  torch::manual_seed(0);
  auto model = vlmkit::build_model(tiny_config());
  auto root = scratch("model");
  vlmkit::save_model(root.string(), *model);
  auto loaded = vlmkit::load_model(root.string());
  auto a = std::dynamic_pointer_cast<vlmkit::EncoderDecoderImpl<>>(model);
  auto b = std::dynamic_pointer_cast<vlmkit::EncoderDecoderImpl<>>(loaded);
  REQUIRE(b);
  auto images = torch::randn({1, 3, 16, 16});
  auto ids = torch::randint(8, 200, {1, 6});
  ids[0][0] = 3;  // <image>
  REQUIRE(torch::equal(a->forward(images, ids).logits, b->forward(images, ids).logits));
  auto other = vlmkit::json(tiny_config());
  other["decoder"]["d_model"] = 32;
  auto different = vlmkit::build_model(other);
  REQUIRE_THROWS_WITH(vlmkit::load_module_state(*different, vlmkit::module_state(*model), "test"),
                      Catch::Contains("shape mismatch") && Catch::Contains("another architecture"));
}

TEST_CASE("lora: identity at attach, merge == unmerged, trainer trains adapters only, adapter folders round-trip",
          "[lora]") {
  torch::manual_seed(0);
  auto model = vlmkit::build_model(tiny_config());
  auto* m = dynamic_cast<vlmkit::EncoderDecoderImpl<>*>(model.get());
  REQUIRE(m);
  model->eval();
  auto images = torch::randn({2, 3, 16, 16});
  auto ids = torch::randint(8, 200, {2, 6});
  ids.select(1, 0).fill_(3);  // <image>
  const auto base_logits = m->forward(images, ids).logits;
  const auto base_state = vlmkit::module_state(*model);
  std::map<std::string, torch::Tensor> base_copy;
  for (const auto& [k, v] : base_state) base_copy[k] = v.clone();

  auto layers = vlmkit::apply_lora(*model, vlmkit::LoraOptions().rank(2).target_modules({"decoder.*_proj"}));
  REQUIRE(!layers.empty());
  for (const auto& l : layers) REQUIRE(l.rfind("decoder.", 0) == 0);
  REQUIRE(torch::equal(m->forward(images, ids).logits, base_logits));
  REQUIRE_THROWS_WITH(vlmkit::apply_lora(*model, vlmkit::LoraOptions()), Catch::Contains("already"));
  REQUIRE_THROWS_WITH(vlmkit::apply_lora(*vlmkit::build_model(tiny_config()),
                                         vlmkit::LoraOptions().target_modules({"nothing_here"})),
                      Catch::Contains("selects no Linear layer") && Catch::Contains("q_proj"));

  // Train: only adapters change.
  model->train();
  vlmkit::Trainer trainer(model, vlmkit::TrainerOptions().steps(4).lr(1e-2).warmup_steps(0).log_every(0));
  for (const auto& [name, p] : trainer.trainable()) REQUIRE(name.find(".lora_") != std::string::npos);
  FixedBatches data(4);
  trainer.fit(data);
  model->eval();
  for (const auto& [k, v] : vlmkit::module_state(*model)) {
    INFO(k);
    if (k.find(".lora_") == std::string::npos) REQUIRE(torch::equal(v, base_copy.at(k)));
  }
  const auto tuned = m->forward(images, ids).logits;
  REQUIRE(!torch::allclose(tuned, base_logits));

  // Merge: the same function; a merged model refuses a whole-model save.
  vlmkit::merge_lora(*model);
  REQUIRE(close(m->forward(images, ids).logits, tuned, 1e-5));
  auto dir = scratch("lora");
  REQUIRE_THROWS_WITH(vlmkit::save_model(dir.string(), *model), Catch::Contains("merged"));
  vlmkit::unmerge_lora(*model);
  REQUIRE(close(m->forward(images, ids).logits, tuned, 1e-5));

  // Adapter folder onto a fresh copy of the base; whole checkpoints rebuild adapters.
  const auto folder = vlmkit::save_adapter((dir / "adapter").string(), *model);
  auto other = vlmkit::build_model(tiny_config());
  vlmkit::load_module_state(*other, base_copy, "base");
  vlmkit::load_adapter(*other, folder);
  other->eval();
  REQUIRE(torch::equal(dynamic_cast<vlmkit::EncoderDecoderImpl<>*>(other.get())->forward(images, ids).logits, tuned));
  auto state = vlmkit::adapter_state(*model);
  REQUIRE(state.size() == 2 * layers.size());
  REQUIRE(state.count("base_model.model." + layers.front() + ".lora_A.weight"));
  vlmkit::save_model(dir.string(), *model, "whole");
  auto loaded = vlmkit::load_model((dir / "whole").string());
  loaded->eval();
  // (bit-equal to the model saved; merge + unmerge left its weights within rounding of the base's)
  REQUIRE(torch::equal(dynamic_cast<vlmkit::EncoderDecoderImpl<>*>(loaded.get())->forward(images, ids).logits,
                       m->forward(images, ids).logits));
  // clone() copies the adapter too.
  for (const auto& item : model->named_modules("", false)) {
    if (item.key() != layers.front()) continue;
    auto* layer = dynamic_cast<vlmkit::LinearImpl*>(item.value().get());
    REQUIRE(layer);
    auto copy = std::dynamic_pointer_cast<vlmkit::LinearImpl>(layer->clone());
    REQUIRE(copy);
    REQUIRE(copy->has_lora());
    auto x = torch::randn({3, layer->options.in_features()});
    REQUIRE(torch::equal(copy->forward(x), layer->forward(x)));
  }
  // Removing with merge gives the base architecture with the tuned function.
  vlmkit::remove_lora(*model, /*merge=*/true);
  REQUIRE(vlmkit::lora_layers(*model).empty());
  REQUIRE(close(m->forward(images, ids).logits, tuned, 1e-5));
  REQUIRE(vlmkit::module_state(*model).size() == base_copy.size());
}

TEST_CASE("trainer: loss falls; resume after an interruption equals an uninterrupted run", "[trainer]") {
  auto run = [](const fs::path& out, int64_t stop_after) {
    torch::manual_seed(0);
    auto model = vlmkit::build_model(tiny_config());
    vlmkit::Trainer trainer(model, vlmkit::TrainerOptions()
                                       .steps(12)
                                       .lr(3e-3)
                                       .warmup_steps(2)
                                       .checkpoint_every(4)
                                       .log_every(1)
                                       .output_dir(out.string()));
    std::vector<double> losses;
    trainer.on_log([&](const vlmkit::json& r) {
      if (!r.contains("loss")) return;
      losses.push_back(r["loss"].get<double>());
      if (r["step"].get<int64_t>() == stop_after) throw std::runtime_error("interrupted");
    });
    const bool resumed = trainer.resume();
    FixedBatches data(5);
    try {
      trainer.fit(data);
    } catch (const std::runtime_error&) {
    }
    return std::make_tuple(model, losses, resumed);
  };
  auto dir = scratch("trainer");
  auto [full, full_losses, r0] = run(dir / "full", -1);
  REQUIRE(!r0);
  REQUIRE(full_losses.size() == 12);
  REQUIRE(full_losses.back() < full_losses.front() - 0.1);  // 5.57 (uniform) towards 5.26 (the 8..199 range)

  auto [part, part_losses, r1] = run(dir / "cut", 10);  // last checkpoint at step 8
  REQUIRE(!r1);
  REQUIRE(part_losses.size() == 10);  // the interruption, not another error, ended it
  auto [rest, rest_losses, r2] = run(dir / "cut", -1);
  REQUIRE(r2);
  REQUIRE(rest_losses.size() == 4);
  for (size_t i = 0; i < 4; ++i) REQUIRE(rest_losses[i] == full_losses[8 + i]);
  auto a = vlmkit::module_state(*full), b = vlmkit::module_state(*rest);
  for (const auto& [k, v] : a) {
    INFO(k);
    REQUIRE(torch::equal(v, b.at(k)));
  }
  // The log of the resumed run has no duplicate steps.
  std::ifstream log(dir / "cut" / "metrics.jsonl");
  std::string line;
  std::set<int64_t> steps;
  while (std::getline(log, line)) {
    auto r = vlmkit::json::parse(line);
    if (r.contains("loss")) REQUIRE(steps.insert(r["step"].get<int64_t>()).second);
  }
  REQUIRE(steps.size() == 12);
}

TEST_CASE("trainer: freezing, parameter groups, schedule, accumulation and the non-finite guard", "[trainer]") {
  torch::manual_seed(0);
  auto model = vlmkit::build_model(tiny_config());
  auto frozen_before = vlmkit::module_state(*model).at("image_encoder.patch_embed.weight").clone();
  vlmkit::Trainer stage1(model, vlmkit::TrainerOptions()
                                    .steps(3)
                                    .freeze({"image_encoder", "decoder"})
                                    .group_lr({{"projector", 1e-2}})
                                    .warmup_steps(0)
                                    .accumulation(2)
                                    .log_every(0));
  for (const auto& [name, p] : stage1.trainable()) REQUIRE(name.rfind("projector.", 0) == 0);
  FixedBatches data(4);
  auto summary = stage1.fit(data);
  REQUIRE(summary["step"].get<int64_t>() == 3);
  REQUIRE(torch::equal(vlmkit::module_state(*model).at("image_encoder.patch_embed.weight"), frozen_before));
  // Two batches per step over 4 batches: 3 steps run into the second epoch.
  REQUIRE(stage1.state().epoch == 1);
  REQUIRE(stage1.state().batch_in_epoch == 2);
  REQUIRE(stage1.schedule(0) == Approx(1.0));
  REQUIRE(stage1.schedule(3) == Approx(0.0).margin(1e-12));
  // Warmup-stable-decay: warmup, the rate held, then the cosine over the last fifth.
  vlmkit::Trainer wsd(model, vlmkit::TrainerOptions().steps(100).warmup_steps(10).decay_fraction(0.2).log_every(0));
  REQUIRE(wsd.schedule(4) == Approx(0.5));
  REQUIRE(wsd.schedule(50) == Approx(1.0));
  REQUIRE(wsd.schedule(80) == Approx(1.0));
  REQUIRE(wsd.schedule(90) == Approx(0.5));
  REQUIRE(wsd.schedule(100) == Approx(0.0).margin(1e-12));
  // decay_fraction 1 is the cosine over the whole run.
  vlmkit::Trainer cosine(model, vlmkit::TrainerOptions().steps(100).warmup_steps(0).log_every(0));
  REQUIRE(cosine.schedule(50) == Approx(0.5));
  REQUIRE_THROWS_WITH(vlmkit::Trainer(model, vlmkit::TrainerOptions().decay_fraction(0.0)),
                      Catch::Contains("decay_fraction must be in (0, 1]"));

  REQUIRE_THROWS_WITH(vlmkit::Trainer(model, vlmkit::TrainerOptions().freeze({"vision"})),
                      Catch::Contains("matches no parameter") && Catch::Contains("image_encoder"));
  REQUIRE_THROWS_WITH(vlmkit::Trainer(model, vlmkit::TrainerOptions().steps(0)), Catch::Contains("steps"));

  auto nan_loss = [](torch::nn::Module& m, const vlmkit::Batch& b) {
    return vlmkit::generative_loss(m, b) * std::numeric_limits<double>::quiet_NaN();
  };
  auto before = vlmkit::module_state(*model).at("decoder.token_embed.weight").clone();
  vlmkit::Trainer bad(model, vlmkit::TrainerOptions().steps(10).max_nonfinite_steps(3).log_every(0), nan_loss);
  REQUIRE_THROWS_WITH(bad.fit(data), Catch::Contains("not finite for 3 steps"));
  REQUIRE(bad.state().nonfinite_steps == 3);
  REQUIRE(torch::equal(vlmkit::module_state(*model).at("decoder.token_embed.weight"), before));
}

TEST_CASE("activation checkpointing: the same loss and gradients, through the Trainer's loss", "[trainer][checkpointing]") {
  std::vector<std::map<std::string, torch::Tensor>> grads;
  std::vector<double> losses;
  for (bool recompute : {false, true}) {
    auto config = tiny_config();
    config["decoder"]["activation_checkpointing"] = recompute;
    config["image_encoder"]["activation_checkpointing"] = recompute;
    torch::manual_seed(0);
    auto model = vlmkit::build_model(config);
    model->train();
    FixedBatches data(1);
    auto batch = data.next();
    REQUIRE(batch);
    auto loss = vlmkit::generative_loss(*model, *batch);
    loss.backward();
    losses.push_back(loss.item<double>());
    std::map<std::string, torch::Tensor> g;
    for (const auto& p : model->named_parameters()) g[p.key()] = p.value().grad();
    grads.push_back(g);
  }
  REQUIRE(losses[0] == Approx(losses[1]).margin(1e-6));
  for (const auto& [name, g] : grads[0]) {
    INFO(name);
    REQUIRE(g.defined() == grads[1].at(name).defined());
    if (g.defined()) REQUIRE(close(grads[1].at(name), g, 1e-6));
  }
}

TEST_CASE("trainer: bf16 autocast trains, restores the autocast state, refuses unknown precisions", "[trainer][bf16]") {
  torch::manual_seed(0);
  auto model = vlmkit::build_model(tiny_config());
  vlmkit::Trainer trainer(model, vlmkit::TrainerOptions().steps(6).lr(3e-3).warmup_steps(0).log_every(1).precision("bf16"));
  std::vector<double> losses;
  trainer.on_log([&](const vlmkit::json& r) {
    if (r.contains("loss")) losses.push_back(r["loss"].get<double>());
  });
  FixedBatches data(3);
  trainer.fit(data);
  REQUIRE(losses.size() == 6);
  REQUIRE(losses.back() < losses.front());
  REQUIRE(!at::autocast::is_cpu_enabled());
  for (const auto& p : model->parameters()) REQUIRE(p.scalar_type() == torch::kFloat);
  {
    vlmkit::detail::Autocast guard(torch::kCPU, torch::kBFloat16);
    REQUIRE(at::autocast::is_cpu_enabled());
    REQUIRE(torch::mm(torch::randn({4, 4}), torch::randn({4, 4})).scalar_type() == torch::kBFloat16);
  }
  REQUIRE(!at::autocast::is_cpu_enabled());
  REQUIRE_THROWS_WITH(vlmkit::Trainer(vlmkit::build_model(tiny_config()), vlmkit::TrainerOptions().precision("fp16")),
                      Catch::Contains("precision must be 'fp32' or 'bf16'"));
}

TEST_CASE("Linear under bf16 autocast computes as torch's linear in Python (bias included)", "[lora][bf16]") {
  torch::manual_seed(0);
  vlmkit::Linear layer(torch::nn::LinearOptions(16, 24));
  for (auto shape : {std::vector<int64_t>{7, 16}, {2, 5, 16}}) {
    auto x = torch::randn(shape);
    auto forward = [&](const std::string& gemm) {
      vlmkit::set_gemm_kernel(gemm);
      vlmkit::detail::Autocast guard(torch::kCPU, torch::kBFloat16);
      return layer->forward(x);
    };
    // ATen's path: what autocast's linear computes, every argument cast to bfloat16, one op.
    auto aten = forward("aten");
    auto want = at::linear(x.to(torch::kBFloat16), layer->weight.to(torch::kBFloat16),
                           layer->bias.to(torch::kBFloat16));
    REQUIRE(aten.scalar_type() == torch::kBFloat16);
    REQUIRE(torch::equal(aten, want));
    // oneDNN's (the default): the same bf16 inputs, float32 accumulation and bias,
    // one rounding of the output to bfloat16.
    auto got = forward("auto");
    vlmkit::set_gemm_kernel("auto");
    REQUIRE(got.scalar_type() == torch::kBFloat16);
    auto exact = x.to(torch::kBFloat16).to(torch::kDouble).matmul(layer->weight.to(torch::kBFloat16).to(torch::kDouble).t()) +
                 layer->bias.detach().to(torch::kDouble);
    REQUIRE(((got.to(torch::kDouble) - exact).abs() <= std::ldexp(1.0, -8) * exact.abs() + 1e-6).all().item<bool>());
  }
}

TEST_CASE("FusedAdamW: the same steps as torch::optim::AdamW", "[train][optim]") {
  torch::manual_seed(0);
  std::vector<torch::Tensor> a, b, initial;
  // {300, 700}: enough elements that the fused pass splits them across threads
  // (run_parallel), beside tensors smaller than one chunk.
  for (auto shape : {std::vector<int64_t>{37, 129}, {5}, {300, 700}, {3, 4, 5}}) {
    initial.push_back(torch::randn(shape));
  }
  // The multi-tensor (foreach) path, taken on CUDA and for other dtypes; the
  // last parameter skips every other step, so its step count (and so its bias
  // corrections) differs from the others' within one foreach batch.
  initial.push_back(torch::randn({8}, torch::kDouble));
  initial.push_back(torch::randn({6, 3}, torch::kDouble));
  initial.push_back(torch::randn({4}, torch::kDouble));
  for (const auto& t : initial) {
    a.push_back(t.clone().requires_grad_(true));
    b.push_back(t.clone().requires_grad_(true));
  }
  auto options = torch::optim::AdamWOptions(3e-3).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1);
  torch::optim::AdamW reference(a, options);
  vlmkit::FusedAdamW fused(b, options);
  for (int step = 0; step < 6; ++step) {
    for (size_t i = 0; i < a.size(); ++i) {
      auto g = torch::randn(a[i].sizes(), a[i].options().requires_grad(false));
      const bool skip = i + 1 == a.size() && step % 2 == 1;
      a[i].mutable_grad() = skip ? torch::Tensor() : g.clone();
      b[i].mutable_grad() = skip ? torch::Tensor() : g.clone();
    }
    reference.step();
    fused.step();
  }
  for (size_t i = 0; i < a.size(); ++i) {
    INFO("parameter " << i);
    REQUIRE(torch::allclose(b[i], a[i], 1e-6, 1e-7));
    REQUIRE((b[i] - initial[i]).abs().max().item<double>() > 1e-3);  // the steps moved it
  }
  // The state is AdamW's: a checkpoint of one loads into the other.
  auto key_count = reference.state().size();
  REQUIRE(fused.state().size() == key_count);
  auto amsgrad = torch::optim::AdamWOptions(1e-3).amsgrad(true);
  vlmkit::FusedAdamW refused(std::vector<torch::Tensor>{b[0]}, amsgrad);
  CHECK_THROWS_AS(refused.step(), c10::ValueError);
}

TEST_CASE("trainer: any module, batches of images and extra targets, a loss of your own", "[trainer]") {
  // A regression net (no vlmkit architecture): images and an extra "target" per
  // batch; examples are counted from the images when there are no token ids.
  struct Regression : vlmkit::BatchSource {
    void start_epoch(int64_t, int64_t first) override { next_ = first; }
    std::optional<vlmkit::Batch> next() override {
      if (next_ >= 4) return std::nullopt;
      auto gen = torch::make_generator<at::CPUGeneratorImpl>(100 + next_++);
      vlmkit::Batch b;
      b.images = torch::randn({6, 3}, gen);
      b.extra["target"] = b.images.sum(1, true);
      return b;
    }
    int64_t num_batches() const override { return 4; }
    int64_t next_ = 0;
  } data;
  auto net = std::make_shared<torch::nn::Module>("Net");
  auto linear = net->register_module("linear", torch::nn::Linear(3, 1));
  data.start_epoch(0, 0);
  const auto first = *data.next();
  const double initial = torch::mse_loss(linear->forward(first.images), first.extra.at("target")).item<double>();
  vlmkit::Trainer trainer(net, vlmkit::TrainerOptions().steps(60).lr(1e-1).warmup_steps(1).log_every(0),
                          [&](torch::nn::Module&, const vlmkit::Batch& b) {
                            return torch::mse_loss(linear->forward(b.images), b.extra.at("target"));
                          });
  const auto summary = trainer.fit(data);
  CHECK(summary["samples"].get<int64_t>() == 60 * 6);
  CHECK(summary["loss"].get<double>() < initial / 10);
  CHECK(vlmkit::Batch{}.num_examples() == 0);
}
