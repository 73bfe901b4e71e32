#include <filesystem>
#include <fstream>
#include <opencv2/imgproc.hpp>

#include "helpers.h"
#include "vlmkit/data/loader.h"
#include "vlmkit/data/masks.h"
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

TEST_CASE("loader: concurrency — restarts mid-epoch, early destruction, skips, sharding", "[data][loader]") {
  // Also the ThreadSanitizer workload (make tsan): many workers, a small
  // prefetch window, epochs restarted before they finish, a loader destroyed
  // while its workers are busy, and bad samples skipped concurrently.
  const auto dir = std::filesystem::temp_directory_path() / "vlmkit_loader_concurrency";
  std::filesystem::remove_all(dir);
  SyntheticOptions options;
  options.image_size = 32;
  SyntheticDataset(24, options).write(dir.string());
  auto records = read_jsonl_manifest((dir / "manifest.jsonl").string());
  records[5].image = (dir / "missing.png").string();
  records[17].image = "data:image/png;base64,AAAA";
  auto opts = LoaderOptions().batch_size(3).num_workers(4).prefetch(2).image_size(32).seed(3)
                  .bad_samples(BadSamplePolicy::skip).color_jitter(0.2);
  std::vector<int64_t> seen;
  {
    Loader loader(records, opts);
    for (int64_t epoch = 0; epoch < 3; ++epoch) {
      loader.start_epoch(epoch);
      for (int k = 0; k < 2; ++k) REQUIRE(loader.next());  // restart before the epoch ends
    }
    loader.start_epoch(5, 2);  // resume at batch 2 of epoch 5
    while (auto b = loader.next())
      for (int64_t i = 0; i < b->indices.size(0); ++i) seen.push_back(b->indices[i].item<int64_t>());
    auto order = loader.epoch_order(5);
    std::vector<int64_t> expected;
    int64_t bad = 0;
    for (size_t p = 6; p < order.size(); ++p) {
      if (order[p] != 5 && order[p] != 17) expected.push_back(order[p]);
      else ++bad;
    }
    REQUIRE(seen == expected);
    REQUIRE(loader.skipped() >= bad);
    loader.start_epoch(6);  // destroyed with workers mid-epoch
  }
  // Two ranks see disjoint halves of every global batch, together all of it.
  std::vector<int64_t> ranks[2];
  records[5] = records[4];
  records[17] = records[16];
  for (int64_t r = 0; r < 2; ++r) {
    Loader shard(records, LoaderOptions(opts).bad_samples(BadSamplePolicy::raise).rank(r).world_size(2));
    shard.start_epoch(1);
    while (auto b = shard.next())
      for (int64_t i = 0; i < b->indices.size(0); ++i) ranks[r].push_back(b->indices[i].item<int64_t>());
  }
  REQUIRE(ranks[0].size() == 12);
  REQUIRE(ranks[1].size() == 12);
  auto global = Loader(records, opts).epoch_order(1);
  for (size_t k = 0; k < 4; ++k)
    for (size_t i = 0; i < 3; ++i) {
      REQUIRE(ranks[0][k * 3 + i] == global[k * 6 + i]);
      REQUIRE(ranks[1][k * 3 + i] == global[k * 6 + 3 + i]);
    }
  std::filesystem::remove_all(dir);
}

TEST_CASE("data: fuzz regression — header sizes whose product overflows", "[data][errors][hostile]") {
  // Found by fuzz_image (UBSan: signed overflow in the pixel-count guard).
  const std::string bytes(
      "\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
      "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
      "\xff\xff\xff\xff\xff\xff\xff\xff\x49\x48\x44\x52\x00\x00\x00\x0c\x00\x00\x00\x09\x08\x00\x00\x00"
      "\x00\x23\xd3\x92\x88\x00\x00\x00\x10\x49\x44\x41\x54\x78\x9c\x63\x0c\x64\x40\x00\x26\x06\xfa\x70"
      "\x00\x29\x46\x00\x63\xff\x70\x26\x69\x00\x00\x00\x00\x49\x45\x4e\x44\xff\xff\xff\xff\xff\xff\xff"
      "\xff\xae\x42\x60\x82",
      125);
  CHECK_THROWS_AS(decode_image(bytes), c10::ValueError);
  CHECK_THROWS_AS(decode_image(bytes, kDefaultMaxPixels, 224), c10::ValueError);
}

TEST_CASE("data: fuzz regression — formats outside the documented five never reach OpenCV", "[data][errors][hostile]") {
  // Found by fuzz_image: 128 bytes then "DICM" went to OpenCV's DICOM decoder
  // (GDCM), whose assertion aborted the process.
  const std::string dicom = std::string(128, '"') + "DICM";
  std::string message;
  try {
    decode_image(dicom);
  } catch (const c10::ValueError& e) {
    message = e.what_without_backtrace();
  }
  REQUIRE_THAT(message, Catch::Contains("not a JPEG/PNG/BMP/TIFF/WebP image"));
  CHECK_THROWS_AS(decode_image("P6\n2 2\n255\n" + std::string(12, '\x7f')), c10::ValueError);  // PPM
  CHECK_THROWS_AS(decode_image("GIF89a\x01\x00\x01\x00"), c10::ValueError);
}

TEST_CASE("loader: dynamic and tiles modes are the same for any thread count", "[data][loader]") {
  // Variable-size batches (dynamic resolution) and several views per record
  // (tiles); also run by make tsan.
  const auto dir = std::filesystem::temp_directory_path() / "vlmkit_loader_dynamic";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::vector<Record> records;
  const std::vector<std::pair<int, int>> shapes{{40, 120}, {120, 40}, {64, 64}, {30, 90}, {90, 60}, {50, 50}, {33, 77}};
  cv::RNG rng(7);
  for (size_t i = 0; i < shapes.size(); ++i) {
    cv::Mat image(shapes[i].first, shapes[i].second, CV_8UC3);
    rng.fill(image, cv::RNG::UNIFORM, 0, 255);
    const auto path = (dir / (std::to_string(i) + ".png")).string();
    save_png(image, path);
    Record r;
    r.image = path;
    r.turns = {{"user", "Colour?"}, {"assistant", "red"}};
    records.push_back(r);
  }
  for (const char* mode : {"dynamic", "tiles"}) {
    auto run = [&](int64_t workers) {
      Loader loader(records, LoaderOptions().batch_size(3).num_workers(workers).prefetch(2).image_size(32)
                                 .resize(mode).color_jitter(0.2).flip_probability(0.5).seed(1));
      loader.start_epoch(1);
      std::vector<Batch> out;
      while (auto b = loader.next()) out.push_back(*b);
      return out;
    };
    auto one = run(1), four = run(4);
    INFO(mode);
    REQUIRE(one.size() == 3);
    for (size_t k = 0; k < one.size(); ++k) {
      REQUIRE(torch::equal(one[k].images, four[k].images));
      REQUIRE(torch::equal(one[k].image_sizes, four[k].image_sizes));
      REQUIRE(torch::equal(one[k].input_ids, four[k].input_ids));
      REQUIRE(one[k].images_per_sample.sum().item<int64_t>() == one[k].images.size(0));
      // One <image> placeholder per image of the sample.
      auto placeholders = one[k].input_ids.eq(ByteTokenizer().special().image).sum(1);
      REQUIRE(torch::equal(placeholders, one[k].images_per_sample));
    }
  }
  std::filesystem::remove_all(dir);
}

namespace {
void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}
}  // namespace

TEST_CASE("datasets: records written with record_to_json read back the same, from every reader", "[data][datasets]") {
  const auto dir = std::filesystem::temp_directory_path() / "vlmkit_record_round_trip";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  write_text(dir / "m.jsonl",
             "{\"image\": \"a.png\", \"question\": \"Is it on the left?\", \"answer\": \"yes\"}\n"
             "{\"image\": \"b.png\", \"caption\": \"two cats\", \"boxes\": [[1, 2.5, 30, 40]], \"labels\": [\"cat\"]}\n");
  write_text(dir / "llava.json",
             "[{\"image\": \"c.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>Where?\"},"
             " {\"from\": \"gpt\", \"value\": \"top right\"}]}]");
  write_text(dir / "inst.json",
             "{\"images\": [{\"id\": 1, \"file_name\": \"d.png\", \"width\": 64, \"height\": 48}],"
             " \"categories\": [{\"id\": 3, \"name\": \"dog\"}],"
             " \"annotations\": [{\"image_id\": 1, \"bbox\": [4, 5, 10, 12], \"category_id\": 3}]}");
  std::vector<Record> all;
  for (auto& r : read_jsonl_manifest((dir / "m.jsonl").string())) all.push_back(r);
  for (auto& r : read_llava_json((dir / "llava.json").string(), dir.string())) all.push_back(r);
  for (auto& r : read_coco_instances((dir / "inst.json").string(), dir.string())) all.push_back(r);
  write_text(dir / "seg.json",
             "{\"images\": [{\"id\": 1, \"file_name\": \"e.png\", \"width\": 4, \"height\": 4}],"
             " \"categories\": [{\"id\": 3, \"name\": \"dog\"}],"
             " \"annotations\": [{\"image_id\": 1, \"bbox\": [0, 2, 3, 2], \"category_id\": 3,"
             " \"segmentation\": [[0, 2, 3, 2, 3, 4], [0, 2, 1, 2, 1, 3]]}]}");
  for (auto& r : read_coco_instances((dir / "seg.json").string(), dir.string(), BadSamplePolicy::raise, nullptr,
                                     CocoTask::segment))
    all.push_back(r);
  REQUIRE(all.size() == 5);
  // The larger of the two parts, and the segmentation answer on the 0..999 grid.
  REQUIRE(all[4].polygons.size() == 1);
  CHECK(all[4].polygons[0].size() == 3);
  CHECK(all[4].answer_from_polygons);
  CHECK(all[4].turns.back().text == "{\"Object\":[\"dog\"],\"Polygon\":[[0,500,749,500,749,999]]}");
  // "left"/"right" in any reader's text fixes the geometry (the LLaVA reader did not: a flip made "top right" wrong).
  CHECK(all[0].fixed_geometry);
  CHECK(all[2].fixed_geometry);
  CHECK(all[3].answer_from_boxes);
  write_jsonl_manifest((dir / "again.jsonl").string(), all);
  const auto again = read_jsonl_manifest((dir / "again.jsonl").string());
  REQUIRE(again.size() == all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    INFO("record " << i);
    CHECK(again[i].image == all[i].image);
    REQUIRE(again[i].turns.size() == all[i].turns.size());
    for (size_t t = 0; t < all[i].turns.size(); ++t) {
      CHECK(again[i].turns[t].role == all[i].turns[t].role);
      CHECK(again[i].turns[t].text == all[i].turns[t].text);
    }
    REQUIRE(again[i].boxes.size() == all[i].boxes.size());
    for (size_t b = 0; b < all[i].boxes.size(); ++b) {
      CHECK(again[i].boxes[b].x1 == all[i].boxes[b].x1);
      CHECK(again[i].boxes[b].y2 == all[i].boxes[b].y2);
    }
    CHECK(again[i].labels == all[i].labels);
    CHECK(again[i].fixed_geometry == all[i].fixed_geometry);
    CHECK(again[i].answer_from_boxes == all[i].answer_from_boxes);
    CHECK(again[i].answer_from_polygons == all[i].answer_from_polygons);
    REQUIRE(again[i].polygons.size() == all[i].polygons.size());
    for (size_t p = 0; p < all[i].polygons.size(); ++p) {
      REQUIRE(again[i].polygons[p].size() == all[i].polygons[p].size());
      for (size_t v = 0; v < all[i].polygons[p].size(); ++v) {
        CHECK(again[i].polygons[p][v].x == all[i].polygons[p][v].x);
        CHECK(again[i].polygons[p][v].y == all[i].polygons[p][v].y);
      }
    }
  }
  // COCO fields of the wrong JSON type are clear ValueErrors, not nlohmann exceptions escaping the reader.
  write_text(dir / "bad.json",
             "{\"images\": [{\"id\": 1, \"file_name\": \"d.png\", \"width\": \"64\", \"height\": 48}],"
             " \"annotations\": []}");
  CHECK_THROWS_AS(read_coco_instances((dir / "bad.json").string(), dir.string()), c10::ValueError);
  write_text(dir / "bad2.json",
             "{\"images\": [{\"id\": 1, \"file_name\": \"d.png\"}], \"categories\": [{\"id\": \"x\", \"name\": \"a\"}],"
             " \"annotations\": [{\"image_id\": 1, \"bbox\": [0, 0, 1, 1], \"category_id\": 3}]}");
  CHECK_THROWS_AS(read_coco_instances((dir / "bad2.json").string(), dir.string()), c10::ValueError);
  write_text(dir / "bad.jsonl", "{\"image\": \"a.png\", \"caption\": \"x\", \"answer_from_boxes\": true}\n");
  CHECK_THROWS_AS(read_jsonl_manifest((dir / "bad.jsonl").string()), c10::ValueError);
}

TEST_CASE("polygons: text on the 0..999 grid, parsed back; boxes and malformed groups are not polygons", "[data][masks]") {
  const Polygon triangle{{0, 0}, {64, 0}, {32, 48}};
  CHECK(polygon_to_text(triangle, 64, 48) == "[0,0,999,0,500,999]");
  const auto parsed = parse_polygons("{\"Polygon\": [[0, 0, 999, 0, 500, 999], [1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]}",
                                     64, 48);
  REQUIRE(parsed.size() == 2);  // the box is skipped, the odd group drops its last number
  CHECK(parsed[0][1].x == Approx(64.0));
  CHECK(parsed[0][2].y == Approx(48.0));
  CHECK(parsed[1].size() == 3);
  CHECK(parse_polygons("[1000, 0, 1, 1, 2, 2]", 10, 10).empty());  // off the grid
  CHECK(parse_polygons("[1, 2, 3, 4, 5, -6]", 10, 10).empty());    // not unsigned integers
  CHECK(parse_polygons("[1, 2, 3, 4, 5, 6", 10, 10).empty());      // cut off
  CHECK(polygon_area(triangle) == Approx(64 * 48 / 2.0));
  CHECK_THROWS_AS(segmentation_answer({"a"}, {}, 10, 10), c10::ValueError);
  CHECK_THROWS_AS(polygon_to_text({{0, 0}, {1, 1}}, 10, 10), c10::ValueError);
}

TEST_CASE("masks: traced outlines give the mask back; simplified ones stay bounded and close", "[data][masks]") {
  cv::Mat mask = cv::Mat::zeros(40, 50, CV_8UC1);
  cv::circle(mask, {20, 18}, 11, cv::Scalar(1), cv::FILLED);
  cv::rectangle(mask, cv::Point(38, 0), cv::Point(49, 6), cv::Scalar(1), cv::FILLED);  // touches two image edges
  const auto parts = mask_to_polygons(mask, 1 << 20);
  REQUIRE(parts.size() == 2);
  CHECK(polygon_area(parts[0]) > polygon_area(parts[1]));
  cv::Mat back = polygon_to_mask(parts, 40, 50);
  CHECK(cv::countNonZero(back != mask) == 0);
  const auto simple = mask_to_polygon(mask, 12);
  CHECK(simple.size() <= 12);
  cv::Mat circle = cv::Mat::zeros(40, 50, CV_8UC1);
  cv::circle(circle, {20, 18}, 11, cv::Scalar(1), cv::FILLED);
  CHECK(mask_iou(polygon_to_mask({simple}, 40, 50), circle) > 0.93);
  CHECK(mask_to_polygons(cv::Mat::zeros(5, 5, CV_8UC1)).empty());
  CHECK_THROWS_AS(mask_to_polygon(cv::Mat::zeros(5, 5, CV_8UC1)), c10::ValueError);
  CHECK_THROWS_AS(mask_to_polygons(cv::Mat::zeros(5, 5, CV_32F)), c10::ValueError);
  CHECK_THROWS_AS(mask_iou(mask, cv::Mat::zeros(5, 5, CV_8UC1)), c10::ValueError);
  // A single pixel is a polygon too.
  cv::Mat dot = cv::Mat::zeros(5, 5, CV_8UC1);
  dot.at<uint8_t>(2, 3) = 1;
  CHECK(cv::countNonZero(polygon_to_mask({mask_to_polygon(dot, 3)}, 5, 5) != dot) == 0);
}

TEST_CASE("masks: COCO RLE, counts and compressed strings", "[data][masks]") {
  // 3x3 with the centre set: column-major runs 4, 1, 4.
  cv::Mat centre = decode_coco_rle(std::vector<int64_t>{4, 1, 4}, 3, 3);
  CHECK(centre.at<uint8_t>(1, 1) == 1);
  CHECK(cv::countNonZero(centre) == 1);
  CHECK(encode_coco_rle(centre) == "414");
  // From the fourth run on, a run is stored as the difference to the run two before (here -1: 'O').
  cv::Mat m = decode_coco_rle(std::string(":23O"), 4, 4);
  CHECK(cv::countNonZero(m != decode_coco_rle(std::vector<int64_t>{10, 2, 3, 1}, 4, 4)) == 0);
  CHECK(encode_coco_rle(m) == ":23O");
  cv::Mat blob = cv::Mat::zeros(37, 29, CV_8UC1);
  cv::ellipse(blob, {14, 18}, {9, 15}, 30, 0, 360, cv::Scalar(1), cv::FILLED);
  CHECK(cv::countNonZero(decode_coco_rle(encode_coco_rle(blob), 37, 29) != blob) == 0);
  CHECK_THROWS_AS(decode_coco_rle(std::vector<int64_t>{4, 1}, 3, 3), c10::ValueError);     // 5 of 9 pixels
  CHECK_THROWS_AS(decode_coco_rle(std::vector<int64_t>{4, 1, 5}, 3, 3), c10::ValueError);  // 10 of 9
  CHECK_THROWS_AS(decode_coco_rle(std::string("4\x01"), 3, 3), c10::ValueError);
}

TEST_CASE("masks: transforms move polygons as they move the pixels", "[data][masks]") {
  cv::Mat mask = cv::Mat::zeros(48, 64, CV_8UC1);
  cv::fillConvexPoly(mask, std::vector<cv::Point>{{10, 5}, {50, 12}, {30, 40}}, cv::Scalar(1));
  const auto polygon = mask_to_polygons(mask, 1 << 20);
  // Flip: exact.
  cv::Mat flipped;
  cv::flip(mask, flipped, 1);
  CHECK(cv::countNonZero(polygon_to_mask(flip_polygons(polygon, 64), 48, 64) != flipped) == 0);
  // Crop, then resize 2x: against the crop of the mask resized (nearest).
  const auto cropped = crop_polygons(polygon, 20, 8, 30, 30, 2.0, 2.0);
  cv::Mat crop_mask;
  cv::resize(mask(cv::Rect(20, 8, 30, 30)), crop_mask, cv::Size(60, 60), 0, 0, cv::INTER_NEAREST);
  CHECK(mask_iou(polygon_to_mask(cropped, 60, 60), crop_mask) > 0.95);
  CHECK(crop_polygons(polygon, 55, 40, 5, 5)[0].empty());  // wholly outside
  // Letterbox to 32: the 64x48 image becomes 32x24 with 4 rows of padding above.
  LetterboxInfo info;
  cv::Mat rgb(48, 64, CV_8UC3, cv::Scalar(0, 0, 0));
  rgb.setTo(cv::Scalar(255, 255, 255), mask);
  cv::Mat boxed = letterbox(rgb, 32, &info, 0);
  cv::Mat channels[3];
  cv::split(boxed, channels);
  CHECK(mask_iou(polygon_to_mask(letterbox_polygons(polygon, info), 32, 32), channels[0] >= 128) > 0.9);
  // Random resized crop: boxes and polygons of one object list stay together.
  std::mt19937_64 rng(3);
  std::vector<Box> boxes{{10, 5, 50, 40}};
  std::vector<Polygon> polygons = polygon;
  auto out = random_resized_crop(rgb, 40, rng, {0.5, 1.0}, {0.75, 1.33}, &boxes, &polygons);
  REQUIRE(boxes.size() == polygons.size());
  if (!polygons.empty()) {
    cv::split(out, channels);
    CHECK(mask_iou(polygon_to_mask(polygons, 40, 40), channels[0] >= 128) > 0.9);
  }
  std::vector<Polygon> two{polygon[0], polygon[0]};
  CHECK_THROWS_AS(random_resized_crop(rgb, 40, rng, {0.5, 1.0}, {0.75, 1.33}, &boxes, &two), c10::ValueError);
}

TEST_CASE("synthetic: each object's exact mask, its traced outline and the segmentation answers", "[data][masks]") {
  SyntheticOptions options;
  options.word_probability = 0;  // a word drawn across an object can leave holes, which outlines do not keep
  SyntheticDataset data(40, options);
  for (int64_t i = 0; i < data.size(); ++i) {
    const auto sample = data.get(i);
    for (const auto& o : sample.objects) {
      REQUIRE(cv::countNonZero(o.mask) > 50);
      CHECK(cv::countNonZero(polygon_to_mask({o.polygon}, 64, 64) != o.mask) == 0);
    }
    const auto& outlines = sample.segmentation["Polygon"];
    REQUIRE(outlines.size() == sample.objects.size());
    for (size_t k = 0; k < outlines.size(); ++k) {
      CHECK(outlines[k].size() <= 2 * SyntheticDataset::kSegmentVertices);
      const auto back = parse_polygons(outlines[k].dump(), 64, 64);
      REQUIRE(back.size() == 1);
      CHECK(mask_iou(polygon_to_mask(back, 64, 64), sample.objects[k].mask) > 0.85);
    }
    CHECK(sample.segment.question.rfind("Segment the ", 0) == 0);
    const auto answer = nlohmann::json::parse(sample.segment.answer);
    CHECK(sample.segment.question == "Segment the " + answer["Object"][0].get<std::string>() + ".");
  }
}