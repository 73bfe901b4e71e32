// C++ microbenchmarks (Google Benchmark): the hot paths a VLM spends its time
// in, measured without Python. Built as vlmkit_micro when libbenchmark-dev is
// installed; `make bench` runs it.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "vlmkit/generate/json_schema.h"
#include "vlmkit/kernels/gemm.h"
#include "vlmkit/kernels/norm.h"
#include "vlmkit/models/build.h"
#include "vlmkit/modules/attention.h"
#include "vlmkit/runtime.h"
#ifdef VLMKIT_WITH_OPENCV
#include "vlmkit/data/image.h"
#include "vlmkit/data/synthetic.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#endif

namespace {

vlmkit::json small_vlm() {
  return {{"architecture", "encoder_decoder"},
          {"image_encoder", {{"type", "vit"}, {"image_size", 64}, {"patch_size", 8}, {"d_model", 128}, {"depth", 3},
                             {"num_heads", 4}, {"stem", "conv"}, {"pool", "mean"}}},
          {"projector", {{"type", "pixel_shuffle"}, {"factor", 2}}},
          {"fusion", "concat"},
          {"attention", "prefix_lm"},
          {"decoder", {{"d_model", 128}, {"depth", 4}, {"num_heads", 4}, {"max_len", 256}}}};
}

void BM_Attention(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t t = state.range(0);
  vlmkit::MultiheadAttention attn(vlmkit::MultiheadAttentionOptions(128, 4));
  auto x = torch::randn({8, t, 128});
  for (auto _ : state) benchmark::DoNotOptimize(attn->forward(x, {}, {}, {}, true));
  state.SetItemsProcessed(state.iterations() * 8 * t);
}
BENCHMARK(BM_Attention)->Arg(32)->Arg(128)->Arg(512)->Unit(benchmark::kMicrosecond);

// QK-norm's RMSNorm, forward and backward over the rows of one packed batch of the
// small VLM ([32 x 256 x 4 heads, 32]): Arg(0) the ATen ops, Arg(1) the fused kernel.
void BM_RmsNorm(benchmark::State& state) {
  const std::string before = vlmkit::norm_kernel();
  vlmkit::set_norm_kernel(state.range(0) == 1 ? "auto" : "aten");
  vlmkit::Norm norm(32, vlmkit::NormType::rmsnorm, 1e-6);
  auto x = torch::randn({32 * 256 * 4, 32}).requires_grad_();
  auto grad = torch::randn({32 * 256 * 4, 32});
  for (auto _ : state) {
    auto y = norm->forward(x);
    y.backward(grad);
  }
  vlmkit::set_norm_kernel(before);
  state.SetItemsProcessed(state.iterations() * x.size(0));
}
BENCHMARK(BM_RmsNorm)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// One Linear of the small VLM's encoder MLP at batch 32 ([2048, 128] -> 512),
// forward and backward: Arg(0) ATen's (OpenBLAS on Debian's LibTorch), Arg(1)
// oneDNN's sgemm (kernels/gemm.h). Counter: GFLOP/s over the three products, by
// wall time (the pool's second thread works while the caller's CPU clock runs).
void BM_Linear(benchmark::State& state) {
  const std::string before = vlmkit::gemm_kernel();
  vlmkit::set_gemm_kernel(state.range(0) == 1 ? "auto" : "aten");
  auto x = torch::randn({2048, 128}).requires_grad_();
  auto w = (torch::randn({512, 128}) * 0.05).requires_grad_();
  auto b = torch::zeros({512}).requires_grad_();
  auto grad = torch::randn({2048, 512});
  for (auto _ : state) vlmkit::kernels::linear(x, w, b).backward(grad);
  vlmkit::set_gemm_kernel(before);
  state.counters["GFLOP/s"] =
      benchmark::Counter(3.0 * 2 * 2048 * 128 * 512 * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Linear)->Arg(0)->Arg(1)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_TrainStep(benchmark::State& state) {
  const int64_t b = state.range(0);
  torch::manual_seed(0);
  auto model = std::dynamic_pointer_cast<vlmkit::EncoderDecoderImpl<>>(vlmkit::build_model(small_vlm()));
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-4));
  auto images = torch::randn({b, 3, 64, 64});
  auto ids = torch::randint(8, 264, {b, 48});
  ids.select(1, 1).fill_(3);
  auto labels = ids.clone();
  for (auto _ : state) {
    opt.zero_grad();
    model->forward(images, ids, {}, labels).loss.backward();
    opt.step();
  }
  state.SetItemsProcessed(state.iterations() * b);
}
BENCHMARK(BM_TrainStep)->Arg(1)->Arg(32)->Unit(benchmark::kMillisecond);

void BM_GenerateToken(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const bool cache = state.range(0) != 0;
  auto model = std::dynamic_pointer_cast<vlmkit::EncoderDecoderImpl<>>(vlmkit::build_model(small_vlm()));
  model->eval();
  auto images = torch::randn({1, 3, 64, 64});
  std::vector<int64_t> prompt = {1, 3, 50, 60, 70, 80};
  const int64_t n = 32;
  for (auto _ : state)
    benchmark::DoNotOptimize(
        model->generate(images, {prompt}, vlmkit::GenerationOptions().max_new_tokens(n).stop_tokens({}).use_cache(cache)));
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_GenerateToken)->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond);

void BM_JsonSchemaFeed(benchmark::State& state) {
  vlmkit::ordered_json schema = vlmkit::ordered_json::parse(
      R"({"type":"object","properties":{"Object":{"type":"array","items":{"type":"string"}},
          "Bounding_box":{"type":"array","items":{"type":"array","items":{"type":"integer","minimum":0,"maximum":999}}}}})");
  const std::string text = R"({"Object":["red circle","blue square"],"Bounding_box":[[1,2,300,400],[500,6,700,800]]})";
  for (auto _ : state) {
    vlmkit::JsonSchemaMatcher m(schema);
    for (char c : text) benchmark::DoNotOptimize(m.feed(c));
  }
  state.SetBytesProcessed(state.iterations() * int64_t(text.size()));
}
BENCHMARK(BM_JsonSchemaFeed);

#ifdef VLMKIT_WITH_OPENCV
void BM_DecodeResizeNormalize(benchmark::State& state) {
  vlmkit::SyntheticOptions options;
  options.image_size = 256;
  auto sample = vlmkit::SyntheticDataset(1, options).get(0);
  std::vector<uchar> png;
  cv::Mat bgr;
  cv::cvtColor(sample.image, bgr, cv::COLOR_RGB2BGR);
  cv::imencode(".jpg", bgr, png);
  const std::string bytes(png.begin(), png.end());
  auto norm = vlmkit::Normalization::preset("clip");
  for (auto _ : state)
    benchmark::DoNotOptimize(vlmkit::to_chw_tensor(vlmkit::resize_square(vlmkit::decode_image(bytes, vlmkit::kDefaultMaxPixels, 224), 224), norm));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_DecodeResizeNormalize)->Unit(benchmark::kMicrosecond);

// The loader benchmark's image: 640x480 JPEG (quality 90) with noise.
std::string noisy_jpeg() {
  cv::Mat image(480, 640, CV_8UC3);
  cv::randu(image, 0, 255);
  cv::GaussianBlur(image, image, cv::Size(9, 9), 3.0);
  cv::Mat noise(480, 640, CV_8UC3);
  cv::randu(noise, 0, 16);
  image += noise;
  std::vector<uchar> jpg;
  cv::imencode(".jpg", image, jpg, {cv::IMWRITE_JPEG_QUALITY, 90});
  return std::string(jpg.begin(), jpg.end());
}

// Arg 0: full decode; 1: draft (DCT-scaled to >= 224).
void BM_JpegDecode640(benchmark::State& state) {
  const auto bytes = noisy_jpeg();
  for (auto _ : state)
    benchmark::DoNotOptimize(vlmkit::decode_image(bytes, vlmkit::kDefaultMaxPixels, state.range(0) ? 224 : 0));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_JpegDecode640)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// PIL-compatible anti-aliased resize to 224x224 from 640x480 (arg 0) or 320x240 (arg 1).
void BM_Resize224(benchmark::State& state) {
  const auto image = vlmkit::decode_image(noisy_jpeg(), vlmkit::kDefaultMaxPixels, state.range(0) ? 224 : 0);
  for (auto _ : state) benchmark::DoNotOptimize(vlmkit::resize_square(image, 224));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Resize224)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

void BM_Normalize224(benchmark::State& state) {
  const auto image = vlmkit::resize_square(vlmkit::decode_image(noisy_jpeg()), 224);
  auto norm = vlmkit::Normalization::preset("imagenet");
  auto out = torch::empty({3, 224, 224});
  for (auto _ : state) vlmkit::write_chw(image, norm, out);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Normalize224)->Unit(benchmark::kMicrosecond);
#endif

}  // namespace

int main(int argc, char** argv) {
  vlmkit::apply_default_threads();
  // The heap policy `import vlmkit` applies: without it every few-MB temporary of
  // an ATen reference path takes fresh page faults (BM_RmsNorm/0: 74.6 ms against
  // 5.8 ms with it; the fused path 2.9 against 1.4).
  vlmkit::apply_default_allocator();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
