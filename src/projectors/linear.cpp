#include "vlmkit/projectors/linear.h"

#include <torch/torch.h>

#include "vlmkit/modules/transformer.h"

namespace vlmkit {

VLMKIT_REGISTER_PROJECTOR(LinearProjectorImpl, "LinearProjector", "LLaVA projector: one Linear per token; N tokens out")

LinearProjectorImpl::LinearProjectorImpl(Options options_)
    : ProjectorBase("vlmkit::LinearProjector", std::move(options_)) {
  fc1 = register_module("fc1", Linear(options.in_dim(), options.out_dim()));
  detail::init_transformer_weights(*this);
}

torch::Tensor LinearProjectorImpl::forward(const EncoderOutput& image) {
  detail::check_image_tokens(image, options.in_dim(), "LinearProjector");
  return fc1->forward(image.tokens);
}

}  // namespace vlmkit
