// The contrastive and classification losses (losses/losses.h).
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
namespace {
void check_square_logits(const torch::Tensor& logits, const char* who) {
  TORCH_CHECK_VALUE(logits.defined() && logits.dim() == 2 && logits.size(0) == logits.size(1) &&
                        logits.size(0) > 0,
                    who, ": expected square logits [B, B] with B >= 1, got ",
                    logits.defined() ? detail::shape_str(logits) : std::string("undefined"));
}
}  // namespace

ContrastiveLossTable& contrastive_loss_table() {
  static ContrastiveLossTable table("contrastive loss");
  return table;
}

VLMKIT_REGISTER(contrastive_loss_table(),
                ContrastiveLossRow{"clip", "CLIP's symmetric InfoNCE over rows and columns (Radford et al. 2021)",
                                   false, clip_loss})
VLMKIT_REGISTER(contrastive_loss_table(),
                ContrastiveLossRow{"siglip", "SigLIP's pairwise sigmoid loss with a learned bias (Zhai et al. 2023)",
                                   true, siglip_loss})

torch::Tensor clip_loss(const torch::Tensor& logits_per_image) {
  check_square_logits(logits_per_image, "clip_loss");
  auto labels = torch::arange(logits_per_image.size(0),
                              torch::TensorOptions().dtype(torch::kLong).device(logits_per_image.device()));
  return 0.5 * (F::cross_entropy(logits_per_image, labels) +
                F::cross_entropy(logits_per_image.t(), labels));
}

torch::Tensor siglip_loss(const torch::Tensor& logits_per_image) {
  check_square_logits(logits_per_image, "siglip_loss");
  const int64_t b = logits_per_image.size(0);
  auto signs = 2 * torch::eye(b, logits_per_image.options()) - 1;
  return -F::logsigmoid(signs * logits_per_image).sum() / double(b);
}

torch::Tensor classification_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                                  double label_smoothing) {
  TORCH_CHECK_VALUE(logits.defined() && logits.dim() == 2,
                    "classification_loss: expected logits of shape [B, C], got ",
                    logits.defined() ? detail::shape_str(logits) : std::string("undefined"));
  TORCH_CHECK_TYPE(labels.defined() && labels.scalar_type() == torch::kLong,
                   "classification_loss: expected int64 class labels, got ",
                   labels.defined() ? c10::toString(labels.scalar_type()) : "undefined");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0),
                    "classification_loss: expected labels of shape [", logits.size(0), "], got ",
                    detail::shape_str(labels));
  if (labels.numel() > 0) {
    const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < logits.size(1), "classification_loss: labels must be in [0, ",
                      logits.size(1), "), got values in [", lo, ", ", hi, "]");
  }
  return F::cross_entropy(logits, labels,
                          F::CrossEntropyFuncOptions().label_smoothing(label_smoothing));
}

torch::Tensor matching_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  TORCH_CHECK_VALUE(logits.defined() && logits.dim() == 1,
                    "matching_loss: expected logits of shape [B], got ",
                    logits.defined() ? detail::shape_str(logits) : std::string("undefined"));
  TORCH_CHECK_VALUE(labels.defined() && labels.sizes() == logits.sizes(),
                    "matching_loss: expected labels of shape ", detail::shape_str(logits), ", got ",
                    labels.defined() ? detail::shape_str(labels) : std::string("undefined"));
  return F::binary_cross_entropy_with_logits(logits, labels.to(logits.scalar_type()));
}
}  // namespace vlmkit
