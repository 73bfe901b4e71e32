// The projector slot: its registry, make_projector, the shared printer and
// the helpers the implementations share.
#include "vlmkit/projectors/projector.h"

#include <torch/torch.h>

#include <cmath>

#include "../internal.h"

namespace vlmkit {

ProjectorRegistry& projector_registry() {
  static ProjectorRegistry registry("projector");
  return registry;
}

std::shared_ptr<ProjectorModule> make_projector(const json& config, int64_t in_dim, int64_t out_dim,
                                                const std::string& path) {
  return projector_registry().make(config, path, "mlp", in_dim, out_dim);
}

void ProjectorModule::pretty_print(std::ostream& stream) const {
  auto fields = config();
  fields["in_dim"] = input_dim();
  fields["out_dim"] = output_dim();
  detail::print_options(stream, name().c_str(), fields);
}

namespace detail {
void check_projector_dims(int64_t in_dim, int64_t out_dim, const char* who) {
  TORCH_CHECK_VALUE(in_dim > 0 && out_dim > 0, who, ": in_dim and out_dim must be positive, got ", in_dim,
                    " and ", out_dim);
}

void check_image_tokens(const EncoderOutput& image, int64_t in_dim, const char* who) {
  TORCH_CHECK_VALUE(image.tokens.defined() && image.tokens.dim() == 3 && image.tokens.size(2) == in_dim,
                    who, ": expected image tokens of shape [B, N, ", in_dim, "], got ",
                    shape_str(image.tokens));
}

std::array<int64_t, 2> token_grid(const EncoderOutput& image, const char* who) {
  const int64_t n = image.tokens.size(1);
  if (image.grid[0] * image.grid[1] == n) return image.grid;
  const auto side = static_cast<int64_t>(std::llround(std::sqrt(double(n))));
  TORCH_CHECK_VALUE(side * side == n, who, ": needs image tokens on a grid; got ", n,
                    " tokens and no grid");
  return {side, side};
}

torch::Tensor space_to_depth(const torch::Tensor& tokens, std::array<int64_t, 2> grid, int64_t r, const char* who) {
  TORCH_CHECK_VALUE(grid[0] % r == 0 && grid[1] % r == 0, who, ": the token grid ", grid[0], "x", grid[1],
                    " must be divisible by ", r);
  const int64_t b = tokens.size(0), d = tokens.size(2);
  return tokens.reshape({b, grid[0] / r, r, grid[1] / r, r, d})
      .permute({0, 1, 3, 2, 4, 5})
      .reshape({b, (grid[0] / r) * (grid[1] / r), r * r * d});
}

torch::Tensor merge_padding_mask(const EncoderOutput& image, int64_t r, const char* who) {
  if (!image.padding_mask.defined()) return {};
  const auto grid = image.grid;
  TORCH_CHECK_VALUE(grid[0] % r == 0 && grid[1] % r == 0, who, ": the token grid ", grid[0], "x", grid[1],
                    " must be divisible by ", r);
  const int64_t b = image.padding_mask.size(0);
  auto blocks = image.padding_mask.reshape({b, grid[0] / r, r, grid[1] / r, r});
  auto all = blocks.all(4).all(2), any = blocks.any(4).any(2);
  TORCH_CHECK_VALUE(all.eq(any).all().item<bool>(), who, ": an image's token grid must be divisible by ", r,
                    " (image sizes multiples of patch_size * ", r, ", as data.dynamic_resolution with merge=", r,
                    " gives)");
  return all.reshape({b, -1});
}
}  // namespace detail

}  // namespace vlmkit
