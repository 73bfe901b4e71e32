#include "strided_projector.h"

#include <torch/torch.h>

namespace vlmkit::test {

VLMKIT_REGISTER_PROJECTOR(StridedProjectorImpl, "TestStridedProjector",
                          "Test-only: every stride-th token, then a Linear")

StridedProjectorImpl::StridedProjectorImpl(Options options_)
    : ProjectorBase("vlmkit::test::StridedProjector", std::move(options_)) {
  TORCH_CHECK_VALUE(options.stride() >= 1, "StridedProjector: stride must be >= 1");
  proj = register_module("proj", Linear(options.in_dim(), options.out_dim()));
}

torch::Tensor StridedProjectorImpl::forward(const EncoderOutput& image) {
  detail::check_image_tokens(image, options.in_dim(), "StridedProjector");
  return proj->forward(image.tokens.slice(1, 0, image.tokens.size(1), options.stride()));
}

torch::Tensor StridedProjectorImpl::output_padding_mask(const EncoderOutput& image) const {
  if (!image.padding_mask.defined()) return {};
  return image.padding_mask.slice(1, 0, image.padding_mask.size(1), options.stride());
}

int64_t StridedProjectorImpl::num_output_tokens(int64_t rows, int64_t cols) const {
  return (rows * cols + options.stride() - 1) / options.stride();
}

}  // namespace vlmkit::test
