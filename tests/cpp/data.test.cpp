#include <filesystem>

#include "helpers.h"
#include "vlmkit/data/loader.h"
#include "vlmkit/data/synthetic.h"

using namespace vlmkit;

TEST_CASE("data: synthetic scenes through the manifest reader into C++ batches", "[data][loader]") {
  const auto dir = std::filesystem::temp_directory_path() / "vlmkit_data_test";
  std::filesystem::remove_all(dir);
  SyntheticOptions options;
  options.image_size = 32;
  SyntheticDataset(10, options).write(dir.string());
  ReadReport report;
  auto records = read_jsonl_manifest((dir / "manifest.jsonl").string(), BadSamplePolicy::raise, &report);
  REQUIRE(records.size() == 10);
  REQUIRE(report.read == 10);
  auto run = [&](int64_t workers) {
    Loader loader(records, LoaderOptions().batch_size(4).num_workers(workers).image_size(32).seed(7));
    loader.start_epoch(0);
    std::vector<Batch> batches;
    while (auto b = loader.next()) batches.push_back(*b);
    return batches;
  };
  auto one = run(1), three = run(3);
  REQUIRE(one.size() == 3);
  for (size_t i = 0; i < one.size(); ++i) {
    REQUIRE(torch::equal(one[i].indices, three[i].indices));
    REQUIRE(torch::equal(one[i].images, three[i].images));
    REQUIRE(torch::equal(one[i].input_ids, three[i].input_ids));
  }
  REQUIRE(one[0].images.sizes() == torch::IntArrayRef({4, 3, 32, 32}));
  REQUIRE(one[2].indices.size(0) == 2);
  std::filesystem::remove_all(dir);
}

TEST_CASE("data: hostile image bytes raise ValueError, missing files FileNotFoundError", "[data][errors]") {
  CHECK_THROWS_AS(decode_image(""), c10::ValueError);
  CHECK_THROWS_AS(decode_image("not an image"), c10::ValueError);
  CHECK_THROWS_AS(decode_image(std::string("\xff\xd8\xff\xe0", 4)), c10::ValueError);
  CHECK_THROWS_AS(load_image("/nonexistent/file.png"), FileNotFoundError);
  CHECK_THROWS_AS(decode_data_url("data:text/plain,hello"), c10::ValueError);
  cv::Mat image(8, 8, CV_8UC3, cv::Scalar(10, 20, 30));
  auto tensor = to_chw_tensor(image, Normalization::preset("none"));
  REQUIRE(tensor.sizes() == torch::IntArrayRef({3, 8, 8}));
  REQUIRE(tensor[2][0][0].item<float>() == Approx(30.0 / 255));
}
