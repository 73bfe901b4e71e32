// The task heads (modules/heads.h).
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <map>

#include <numeric>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/detail/autocast.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
HeadRegistry& head_registry() {
  static HeadRegistry registry("head");
  return registry;
}

ClassificationHeadImpl::ClassificationHeadImpl(ClassificationHeadOptions options_)
    : ClassificationHeadImpl(std::move(options_), "vlmkit::ClassificationHead", kName) {}

ClassificationHeadImpl::ClassificationHeadImpl(ClassificationHeadOptions options_, const char* module_name,
                                               const char* type)
    : HeadModule(module_name), options(std::move(options_)), type_(type) {
  reset();
}

void ClassificationHeadImpl::reset() {
  TORCH_CHECK_VALUE(options.in_dim() > 0 && options.num_classes() > 0,
                    "ClassificationHead: in_dim and num_classes must be positive, got ",
                    options.in_dim(), " and ", options.num_classes());
  int64_t in = options.in_dim();
  if (options.hidden_dim() > 0) {
    hidden = register_module("hidden", Linear(in, options.hidden_dim()));
    in = options.hidden_dim();
  }
  dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
  out = register_module("out", Linear(in, options.num_classes()));
  detail::init_fan_in_weights(*this);
}

void ClassificationHeadImpl::pretty_print(std::ostream& stream) const {
  json fields = options_to_json(options);
  fields["in_dim"] = options.in_dim();
  detail::print_options(stream, name().c_str(), fields);
}

torch::Tensor ClassificationHeadImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 2 && x.size(1) == options.in_dim(),
                    "ClassificationHead: expected input of shape [B, ", options.in_dim(),
                    "], got ", x.defined() ? detail::shape_str(x) : std::string("undefined"));
  auto h = x;
  if (hidden) h = dropout->forward(torch::gelu(hidden->forward(h)));
  return out->forward(h);
}

torch::Tensor ClassificationHeadImpl::loss(const torch::Tensor& logits, const torch::Tensor& labels,
                                           double label_smoothing) {
  return classification_loss(logits, labels, label_smoothing);
}

json ClassificationHeadImpl::config() const {
  json out = options_to_json(options);
  out["type"] = type_;
  return out;
}

MatchingHeadImpl::MatchingHeadImpl(MatchingHeadOptions options_)
    : ClassificationHeadImpl(options_, "vlmkit::MatchingHead", kName) {
  TORCH_CHECK_VALUE(options.num_classes() == 1, "MatchingHead: a matching head has exactly 1 output, got num_classes=",
                    options.num_classes());
}

torch::Tensor MatchingHeadImpl::forward(const torch::Tensor& x) {
  return ClassificationHeadImpl::forward(x).squeeze(-1);
}

torch::Tensor MatchingHeadImpl::loss(const torch::Tensor& logits, const torch::Tensor& labels, double) {
  return matching_loss(logits, labels);
}

VLMKIT_REGISTER_HEAD(ClassificationHeadImpl, "ClassificationHead",
                     "classification over an answer list: Linear (or MLP) and cross-entropy")
VLMKIT_REGISTER_HEAD(MatchingHeadImpl, "MatchingHead", "binary image-text matching: one logit and BCE")
}  // namespace vlmkit
