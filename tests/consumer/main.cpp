// Builds a Two-Tower model from the installed headers and library, composed
// both by name and by templates, and runs a training step.
#include <torch/torch.h>
#include <vlmkit/vlmkit.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  auto model = vlmkit::build_model({{"architecture", "two_tower"},
                                    {"image_encoder", {{"image_size", 32}, {"depth", 1}}},
                                    {"text_encoder", {{"depth", 1}}}});
  auto two_tower = std::dynamic_pointer_cast<vlmkit::TwoTowerImpl<>>(model);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
  auto out = two_tower->forward(torch::rand({4, 3, 32, 32}), torch::randint(1, 200, {4, 8}));
  out.loss.backward();
  opt.step();

  vlmkit::TwoTowerImpl<vlmkit::ViTImpl, vlmkit::TextEncoderImpl> typed(
      std::make_shared<vlmkit::ViTImpl>(vlmkit::ViTOptions().image_size(32).depth(1)),
      std::make_shared<vlmkit::TextEncoderImpl>(vlmkit::TextEncoderOptions().depth(1)));
  auto typed_out = typed.forward(torch::rand({2, 3, 32, 32}), torch::randint(1, 200, {2, 8}));
  std::cout << "vlmkit " << vlmkit::version() << " loss " << out.loss.item<double>() << " typed "
            << typed_out.loss.item<double>() << "\n";
  return std::isfinite(out.loss.item<double>()) ? 0 : 1;
}
