#include "vlmkit/projectors/mlp.h"

#include <torch/torch.h>

#include "vlmkit/modules/transformer.h"

namespace vlmkit {

VLMKIT_REGISTER_PROJECTOR(MlpProjectorImpl, "MlpProjector",
                          "LLaVA-1.5 projector: Linear-GELU-Linear per token; N tokens out")

MlpProjectorImpl::MlpProjectorImpl(Options options_)
    : ProjectorBase("vlmkit::MlpProjector", std::move(options_)) {
  TORCH_CHECK_VALUE(options.hidden_dim() >= 0, "MlpProjector: hidden_dim must be >= 0 (0 = out_dim), got ",
                    options.hidden_dim());
  const int64_t hidden = options.hidden_dim() > 0 ? options.hidden_dim() : options.out_dim();
  fc1 = register_module("fc1", Linear(options.in_dim(), hidden));
  fc2 = register_module("fc2", Linear(hidden, options.out_dim()));
  detail::init_transformer_weights(*this);
}

torch::Tensor MlpProjectorImpl::forward(const EncoderOutput& image) {
  detail::check_image_tokens(image, options.in_dim(), "MlpProjector");
  return fc2->forward(torch::gelu(fc1->forward(image.tokens)));
}

}  // namespace vlmkit
