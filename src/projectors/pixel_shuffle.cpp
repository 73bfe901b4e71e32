#include "vlmkit/projectors/pixel_shuffle.h"

#include <torch/torch.h>

#include "vlmkit/modules/transformer.h"

namespace vlmkit {

VLMKIT_REGISTER_PROJECTOR(PixelShuffleProjectorImpl, "PixelShuffleProjector",
                          "Space-to-depth projector (nanoVLM, Idefics3); N / factor^2 tokens out")

PixelShuffleProjectorImpl::PixelShuffleProjectorImpl(Options options_)
    : ProjectorBase("vlmkit::PixelShuffleProjector", std::move(options_)) {
  TORCH_CHECK_VALUE(options.factor() >= 1, "PixelShuffleProjector: factor must be >= 1, got ",
                    options.factor());
  const int64_t r = options.factor();
  proj = register_module("proj", Linear(options.in_dim() * r * r, options.out_dim()));
  detail::init_transformer_weights(*this);
}

int64_t PixelShuffleProjectorImpl::num_output_tokens(int64_t rows, int64_t cols) const {
  return (rows / options.factor()) * (cols / options.factor());
}

torch::Tensor PixelShuffleProjectorImpl::forward(const EncoderOutput& image) {
  detail::check_image_tokens(image, options.in_dim(), "PixelShuffleProjector");
  return proj->forward(detail::space_to_depth(image.tokens, detail::token_grid(image, "PixelShuffleProjector"),
                                              options.factor(), "PixelShuffleProjector"));
}

torch::Tensor PixelShuffleProjectorImpl::output_padding_mask(const EncoderOutput& image) const {
  return detail::merge_padding_mask(image, options.factor(), "PixelShuffleProjector");
}

}  // namespace vlmkit
