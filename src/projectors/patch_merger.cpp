#include "vlmkit/projectors/patch_merger.h"

#include <torch/torch.h>

#include "vlmkit/modules/transformer.h"

namespace vlmkit {

VLMKIT_REGISTER_PROJECTOR(PatchMergerProjectorImpl, "PatchMergerProjector",
                          "Qwen2-VL patch merger: LayerNorm, 2x2 merge, MLP; N / 4 tokens out")

PatchMergerProjectorImpl::PatchMergerProjectorImpl(Options options_)
    : ProjectorBase("vlmkit::PatchMergerProjector", std::move(options_)) {
  const int64_t merged = options.in_dim() * 4;
  norm = register_module("norm", Norm(options.in_dim()));
  fc1 = register_module("fc1", Linear(merged, merged));
  fc2 = register_module("fc2", Linear(merged, options.out_dim()));
  detail::init_transformer_weights(*this);
}

int64_t PatchMergerProjectorImpl::num_output_tokens(int64_t rows, int64_t cols) const {
  return (rows / 2) * (cols / 2);
}

torch::Tensor PatchMergerProjectorImpl::forward(const EncoderOutput& image) {
  detail::check_image_tokens(image, options.in_dim(), "PatchMergerProjector");
  auto x = detail::space_to_depth(norm->forward(image.tokens), detail::token_grid(image, "PatchMergerProjector"), 2,
                                  "PatchMergerProjector");
  return fc2->forward(torch::gelu(fc1->forward(x)));
}

torch::Tensor PatchMergerProjectorImpl::output_padding_mask(const EncoderOutput& image) const {
  return detail::merge_padding_mask(image, 2, "PatchMergerProjector");
}

}  // namespace vlmkit
