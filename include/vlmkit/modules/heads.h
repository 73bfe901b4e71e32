#pragma once
/// Task heads: the Two-Leg head slot. A head maps the fused vector [B, in_dim]
/// to the logits the model returns and owns its loss; rows register from
/// src/modules/heads.cpp (VLMKIT_REGISTER_HEAD) into head_registry().
#include <nlohmann/json_fwd.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/dropout.h>

#include "vlmkit/modules/linear.h"
#include "vlmkit/options/models.h"
#include "vlmkit/registry.h"

namespace vlmkit {

/// Base of the Two-Leg heads.
class HeadModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  /// fused [B, in_dim] -> the logits the model returns.
  virtual torch::Tensor forward(const torch::Tensor& fused) = 0;
  /// The loss of `logits` (forward's) against `labels`.
  virtual torch::Tensor loss(const torch::Tensor& logits, const torch::Tensor& labels, double label_smoothing) = 0;
  virtual int64_t input_dim() const = 0;
  virtual nlohmann::json config() const = 0;
};

/// The head slot: rows build a head from (config, path, in_dim); the width
/// comes from the fusion.
using HeadRegistry = SlotRegistry<HeadModule, int64_t>;
HeadRegistry& head_registry();

#define VLMKIT_REGISTER_HEAD(Impl, python_class, doc) \
  VLMKIT_REGISTER(::vlmkit::head_registry(),          \
                  (::vlmkit::slot_row<Impl, ::vlmkit::HeadModule>(python_class, doc, int64_t{1})))

/// Classification over an answer vocabulary (cross-entropy, optional label
/// smoothing): Linear, or Linear -> GELU -> Dropout -> Linear when hidden_dim
/// > 0. Shape: [B, in_dim] -> [B, num_classes].
class ClassificationHeadImpl : public HeadModule {
 public:
  using Options = ClassificationHeadOptions;
  static constexpr const char* kName = "classification";

  explicit ClassificationHeadImpl(ClassificationHeadOptions options_ = {});
  void reset();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x) override;
  torch::Tensor loss(const torch::Tensor& logits, const torch::Tensor& labels, double label_smoothing) override;
  int64_t input_dim() const override { return options.in_dim(); }
  nlohmann::json config() const override;

  ClassificationHeadOptions options;
  Linear hidden{nullptr}, out{nullptr};
  torch::nn::Dropout dropout{nullptr};

 protected:
  /// For heads with these layers: their module name and config type.
  ClassificationHeadImpl(ClassificationHeadOptions options_, const char* module_name, const char* type);

 private:
  const char* type_;
};
TORCH_MODULE(ClassificationHead);

/// Binary image-text matching: the same layers with one output, squeezed to
/// [B]; BCE-with-logits against 0/1 labels.
class MatchingHeadImpl final : public ClassificationHeadImpl {
 public:
  using Options = MatchingHeadOptions;
  static constexpr const char* kName = "matching";

  explicit MatchingHeadImpl(MatchingHeadOptions options_ = MatchingHeadOptions());
  torch::Tensor forward(const torch::Tensor& x) override;
  torch::Tensor loss(const torch::Tensor& logits, const torch::Tensor& labels, double label_smoothing) override;
};

}  // namespace vlmkit
