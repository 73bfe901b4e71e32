#include <cmath>

#include "helpers.h"
#include "vlmkit/losses/losses.h"

using namespace vlmkit;

namespace {
double log_sigmoid(double x) { return -std::log1p(std::exp(-x)); }
}  // namespace

TEST_CASE("losses: CLIP InfoNCE against a hand computation", "[loss]") {
  // logits [[2, 0], [1, 3]]: rows (image->text) and columns (text->image).
  auto logits = torch::tensor({{2.0, 0.0}, {1.0, 3.0}}, torch::kDouble);
  const double row0 = -std::log(std::exp(2.0) / (std::exp(2.0) + std::exp(0.0)));
  const double row1 = -std::log(std::exp(3.0) / (std::exp(1.0) + std::exp(3.0)));
  const double col0 = -std::log(std::exp(2.0) / (std::exp(2.0) + std::exp(1.0)));
  const double col1 = -std::log(std::exp(3.0) / (std::exp(0.0) + std::exp(3.0)));
  const double expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2);
  REQUIRE(clip_loss(logits).item<double>() == Approx(expected).epsilon(1e-12));
  REQUIRE(ClipLoss()->forward(logits).item<double>() == Approx(expected).epsilon(1e-12));
}

TEST_CASE("losses: SigLIP sigmoid loss against a hand computation", "[loss]") {
  auto logits = torch::tensor({{1.0, -2.0}, {0.5, 3.0}}, torch::kDouble);
  const double expected =
      -(log_sigmoid(1.0) + log_sigmoid(2.0) + log_sigmoid(-0.5) + log_sigmoid(3.0)) / 2.0;
  REQUIRE(siglip_loss(logits).item<double>() == Approx(expected).epsilon(1e-12));
}

TEST_CASE("losses: classification with label smoothing and matching", "[loss]") {
  auto logits = torch::tensor({{0.0, std::log(3.0)}}, torch::kDouble);  // p = [0.25, 0.75]
  auto labels = torch::tensor({1}, torch::kLong);
  REQUIRE(classification_loss(logits, labels).item<double>() == Approx(-std::log(0.75)));
  // smoothing 0.2 over 2 classes: target [0.1, 0.9]
  const double smoothed = -(0.1 * std::log(0.25) + 0.9 * std::log(0.75));
  REQUIRE(classification_loss(logits, labels, 0.2).item<double>() == Approx(smoothed));
  auto m = matching_loss(torch::tensor({0.0, 2.0}, torch::kDouble), torch::tensor({1.0, 0.0}, torch::kDouble));
  REQUIRE(m.item<double>() == Approx(-(log_sigmoid(0.0) + log_sigmoid(-2.0)) / 2));
  CHECK_THROWS_AS(classification_loss(logits, torch::tensor({2}, torch::kLong)), c10::IndexError);
  CHECK_THROWS_AS(classification_loss(logits, torch::tensor({1.0})), c10::TypeError);
  CHECK_THROWS_AS(clip_loss(torch::zeros({2, 3})), c10::ValueError);
}
