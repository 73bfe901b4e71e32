#include "vlmkit/projectors/resampler.h"

#include <torch/torch.h>

#include "vlmkit/modules/transformer.h"

namespace vlmkit {

VLMKIT_REGISTER_PROJECTOR(ResamplerProjectorImpl, "ResamplerProjector",
                          "Perceiver resampler / Q-Former: learned queries cross-attend to the image; "
                          "num_queries tokens out")

ResamplerProjectorImpl::ResamplerProjectorImpl(Options options_)
    : ProjectorBase("vlmkit::ResamplerProjector", std::move(options_)) {
  TORCH_CHECK_VALUE(options.num_queries() >= 1 && options.num_layers() >= 1,
                    "ResamplerProjector: num_queries and num_layers must be >= 1");
  TORCH_CHECK_VALUE(options.num_heads() >= 1 && options.out_dim() % options.num_heads() == 0,
                    "ResamplerProjector: out_dim ", options.out_dim(), " must be divisible by num_heads ",
                    options.num_heads());
  queries = register_parameter("queries", torch::randn({1, options.num_queries(), options.out_dim()}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.num_layers(); ++i)
    blocks->push_back(TransformerBlock(TransformerBlockOptions(options.out_dim(), options.num_heads())
                                           .cross_attention(true)
                                           .context_dim(options.in_dim())));
  norm = register_module("norm", Norm(options.out_dim()));
  detail::init_transformer_weights(*this);
}

torch::Tensor ResamplerProjectorImpl::forward(const EncoderOutput& image) {
  detail::check_image_tokens(image, options.in_dim(), "ResamplerProjector");
  auto x = queries.expand({image.tokens.size(0), -1, -1});
  for (const auto& block : *blocks)
    x = block->as<TransformerBlockImpl>()->forward(x, {}, {}, false, image.tokens, image.padding_mask);
  return norm->forward(x);
}

}  // namespace vlmkit
