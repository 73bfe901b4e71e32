// The Vision Transformer image encoder (modules/vit.h).
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
VLMKIT_REGISTER_IMAGE_ENCODER(ViTImpl, "ViT", "Vision Transformer: patch or conv stem, CLS / mean / attention pooling")
ViTImpl::ViTImpl(ViTOptions options_) : ImageEncoderModule("vlmkit::ViT"), options(std::move(options_)) {
  reset();
}

void ViTImpl::reset() {
  const int64_t d = options.d_model(), p = options.patch_size();
  detail::check_heads(d, options.num_heads(), "ViT");
  TORCH_CHECK_VALUE(p > 0 && options.image_size() > 0, "ViT: image_size and patch_size must be positive");
  TORCH_CHECK_VALUE(options.image_size() % p == 0, "ViT: patch_size ", p,
                    " must divide image_size ", options.image_size());
  TORCH_CHECK_VALUE(options.depth() >= 0, "ViT: depth must be >= 0, got ", options.depth());
  TORCH_CHECK_VALUE(options.pos_embedding() != PosEmbedding::sincos2d || d % 4 == 0,
                    "ViT: sincos2d positions need d_model divisible by 4, got ", d);
  if (options.stem() == ViTStem::patch) {
    patch_embed = register_module(
        "patch_embed",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(options.in_channels(), d, p).stride(p)));
  } else {
    TORCH_CHECK_VALUE(p >= 2 && (p & (p - 1)) == 0,
                      "ViT: the conv stem needs a power-of-two patch_size >= 2, got ", p);
    std::vector<int64_t> channels;
    int64_t stages = 0;
    for (int64_t s = p; s > 1; s >>= 1) ++stages;
    for (int64_t i = 0; i < stages; ++i) channels.push_back(std::max<int64_t>(8, d >> (stages - 1 - i)));
    conv_stem = register_module(
        "conv_stem", ConvStage(ConvStageOptions()
                                   .image_size(options.image_size())
                                   .in_channels(options.in_channels())
                                   .channels(channels)
                                   .d_model(d)));
  }
  const int64_t grid = options.image_size() / p;
  if (options.pool() == ImagePool::cls) {
    cls_token = register_parameter("cls_token", torch::randn({1, 1, d}) * 0.02);
    if (options.pos_embedding() == PosEmbedding::learned)
      cls_pos = register_parameter("cls_pos", torch::randn({1, 1, d}) * 0.02);
  }
  if (options.pos_embedding() == PosEmbedding::learned)
    pos_embed = register_parameter("pos_embed", torch::randn({1, grid * grid, d}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.depth(); ++i)
    blocks->push_back(TransformerBlock(TransformerBlockOptions(d, options.num_heads())
                                           .mlp_ratio(options.mlp_ratio())
                                           .dropout(options.dropout())
                                           .norm(options.norm())
                                           .mlp(options.mlp())));
  norm = register_module("norm", Norm(d, options.norm()));
  if (options.pool() == ImagePool::map) {
    const auto hidden = static_cast<int64_t>(std::llround(d * options.mlp_ratio()));
    pool_probe = register_parameter("pool_probe", torch::randn({1, 1, d}) * 0.02);
    pool_attn = register_module("pool_attn", MultiheadAttention(MultiheadAttentionOptions(d, options.num_heads())));
    pool_norm = register_module("pool_norm", Norm(d, options.norm()));
    pool_fc1 = register_module("pool_fc1", Linear(d, hidden));
    pool_fc2 = register_module("pool_fc2", Linear(hidden, d));
  }
  detail::init_transformer_weights(*this);
}

void ViTImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::ViT", options_to_json(options));
}

torch::Tensor ViTImpl::patch_positions(int64_t rows, int64_t cols, torch::TensorOptions like) {
  const int64_t d = options.d_model();
  if (options.pos_embedding() == PosEmbedding::sincos2d)
    return detail::sincos_2d(rows, cols, d).to(like).unsqueeze(0);
  const int64_t grid = options.image_size() / options.patch_size();
  if (rows == grid && cols == grid) return pos_embed;
  auto table = pos_embed.view({1, grid, grid, d}).permute({0, 3, 1, 2});  // [1, D, g, g]
  table = F::interpolate(table, F::InterpolateFuncOptions()
                                    .size(std::vector<int64_t>{rows, cols})
                                    .mode(torch::kBicubic)
                                    .align_corners(false));
  return table.permute({0, 2, 3, 1}).reshape({1, rows * cols, d});
}

EncoderOutput ViTImpl::forward(const torch::Tensor& images) { return forward(images, torch::Tensor()); }

EncoderOutput ViTImpl::forward(const torch::Tensor& images, const torch::Tensor& image_sizes) {
  detail::check_images(images, options.in_channels(), "ViT", norm->weight);
  const int64_t p = options.patch_size();
  TORCH_CHECK_VALUE(images.size(2) % p == 0 && images.size(3) % p == 0,
                    "ViT: expected image height and width to be multiples of patch_size ", p,
                    ", got ", images.size(2), "x", images.size(3));
  const int64_t b = images.size(0), rows = images.size(2) / p, cols = images.size(3) / p;
  const int64_t d = options.d_model();
  torch::Tensor sizes, pad;  // sizes on the CPU; pad [B, rows*cols], true = padding
  if (image_sizes.defined()) {
    sizes = detail::check_image_sizes(image_sizes, images, p, "ViT");
    pad = detail::patch_padding_mask(sizes, images.size(2), images.size(3), p, images.device());
  }
  // Images grouped by size: the conv stem and learned positions see each
  // group's own grid, so a padded image's tokens equal its unpadded ones.
  std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> groups;
  if (pad.defined())
    for (int64_t i = 0; i < b; ++i)
      groups[{sizes[i][0].item<int64_t>(), sizes[i][1].item<int64_t>()}].push_back(i);
  auto per_group = [&](auto&& grid_tokens) {  // grid_tokens(h, w, indices) -> [n, h/p * w/p, D]
    auto out = torch::zeros({b, rows, cols, d}, images.options());
    for (const auto& [size, members] : groups) {
      auto index = torch::tensor(members, torch::kLong).to(images.device());
      const int64_t r = size.first / p, c = size.second / p;
      auto tokens = grid_tokens(size.first, size.second, index).reshape({-1, r, c, d});
      out.index_put_({index}, F::pad(tokens, F::PadFuncOptions({0, 0, 0, cols - c, 0, rows - r})));
    }
    return out.view({b, rows * cols, d});
  };
  torch::Tensor x;
  if (patch_embed) {
    x = patch_embed->forward(images).flatten(2).transpose(1, 2);  // [B, N, D]; per patch, exact under padding
  } else if (!pad.defined()) {
    // Checkpointed with the blocks: the stem's maps are the largest activations
    // the blocks' checkpoints leave (the small VLM at batch 32: ~20 MB in float32).
    const bool recompute = options.activation_checkpointing() && is_training() && torch::GradMode::is_enabled();
    auto* stem = conv_stem.get();
    x = recompute ? detail::checkpoint([stem](const torch::Tensor& img, const torch::Tensor&) {
                      return stem->forward(img).tokens;
                    }, images, {})
                  : conv_stem->forward(images).tokens;
  } else {
    x = per_group([&](int64_t h, int64_t w, const torch::Tensor& index) {
      return conv_stem->forward(images.index_select(0, index).slice(2, 0, h).slice(3, 0, w)).tokens;
    });
  }
  if (!pad.defined() || options.pos_embedding() == PosEmbedding::sincos2d) {
    // Fixed sin-cos positions depend on (row, col) only, not on the grid size.
    x = x + patch_positions(rows, cols, x.options());
  } else {
    x = x + per_group([&](int64_t h, int64_t w, const torch::Tensor& index) {
      return patch_positions(h / p, w / p, x.options()).expand({index.size(0), -1, -1});
    });
  }
  const bool use_cls = options.pool() == ImagePool::cls;
  torch::Tensor key_pad = pad;
  if (use_cls) {
    auto cls = cls_pos.defined() ? cls_token + cls_pos : cls_token;
    x = torch::cat({cls.expand({b, 1, -1}), x}, 1);
    if (pad.defined()) key_pad = torch::cat({torch::zeros({b, 1}, pad.options()), pad}, 1);
  }
  x = norm->forward(detail::run_encoder_blocks(blocks, x, key_pad, options.activation_checkpointing() && is_training()));
  EncoderOutput out;
  out.grid = {rows, cols};
  out.tokens = use_cls ? x.slice(1, 1) : x;
  if (pad.defined()) {
    out.tokens = out.tokens.masked_fill(pad.unsqueeze(-1), 0.0);
    out.padding_mask = pad;
  }
  if (use_cls) {
    out.pooled = x.select(1, 0);
  } else if (options.pool() == ImagePool::map) {
    // SigLIP's MAP head: the probe attends over the (unpadded) tokens.
    auto probe = pool_attn->forward(pool_probe.expand({b, 1, -1}), x, pad);
    probe = probe + pool_fc2->forward(torch::gelu(pool_fc1->forward(pool_norm->forward(probe))));
    out.pooled = probe.select(1, 0);
  } else {
    out.pooled = detail::masked_mean(out.tokens, pad);
  }
  return out;
}
}  // namespace vlmkit
