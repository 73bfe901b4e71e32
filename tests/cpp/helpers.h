#pragma once
// Small helpers shared by the C++ tests.
#include <catch2/catch.hpp>
#include <torch/torch.h>

namespace vlmkit::test {

/// Every parameter received a finite, non-zero gradient.
inline void require_all_grads(const torch::nn::Module& module) {
  for (const auto& item : module.named_parameters()) {
    INFO("parameter " << item.key());
    const auto& grad = item.value().grad();
    REQUIRE(grad.defined());
    REQUIRE(torch::isfinite(grad).all().item<bool>());
    REQUIRE(grad.abs().sum().item<double>() > 0.0);
  }
}

inline bool close(const torch::Tensor& a, const torch::Tensor& b, double atol = 1e-5) {
  return a.sizes() == b.sizes() && (a - b).abs().max().item<double>() <= atol;
}

}  // namespace vlmkit::test
