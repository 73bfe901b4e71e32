// Helpers shared by the building blocks (src/internal.h, modules/encoder.h,
// modules/transformer.h): printing, checks, initialisation, masks, positions.
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <cmath>
#include <map>

#include <numeric>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/detail/autocast.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/kernels/attention.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"
#include "../internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
ImageEncoderRegistry& image_encoder_registry() {
  static ImageEncoderRegistry registry("image encoder type");
  return registry;
}

TextEncoderRegistry& text_encoder_registry() {
  static TextEncoderRegistry registry("text encoder type");
  return registry;
}

namespace detail {

void print_options(std::ostream& stream, const char* name, const json& fields) {
  stream << name << "(";
  bool first = true;
  for (const auto& item : fields.items()) {
    if (item.key() == "type") continue;
    stream << (first ? "" : ", ") << item.key() << "=";
    if (item.value().is_string())
      stream << item.value().get<std::string>();
    else
      stream << item.value().dump();
    first = false;
  }
  stream << ")";
}

std::string shape_str(const torch::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_heads(int64_t dim, int64_t heads, const char* who) {
  TORCH_CHECK_VALUE(dim > 0 && heads > 0, who, ": width and num_heads must be positive, got width ",
                    dim, " and num_heads ", heads);
  TORCH_CHECK_VALUE(dim % heads == 0, who, ": width ", dim, " must be divisible by num_heads ",
                    heads);
}

/// pooled [B, dim] check for the fusion blocks.
void check_pooled(const EncoderOutput& out, int64_t dim, const char* who, const char* which) {
  TORCH_CHECK_VALUE(out.pooled.defined() && out.pooled.dim() == 2 && out.pooled.size(1) == dim,
                    who, ": expected ", which, ".pooled of shape [B, ", dim, "], got ",
                    out.pooled.defined() ? shape_str(out.pooled) : std::string("undefined"));
}

void check_tokens(const EncoderOutput& out, int64_t dim, const char* who, const char* which) {
  TORCH_CHECK_VALUE(out.tokens.defined() && out.tokens.dim() == 3 && out.tokens.size(2) == dim,
                    who, ": expected ", which, ".tokens of shape [B, N, ", dim, "], got ",
                    out.tokens.defined() ? shape_str(out.tokens) : std::string("undefined"));
}

double mask_fill_value(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kDouble: return std::numeric_limits<double>::lowest();
    case torch::kHalf: return -65504.0;
    case torch::kBFloat16: return -3.38e38;
    default: return std::numeric_limits<float>::lowest();
  }
}

torch::Tensor attention_bias(const torch::Tensor& key_padding_mask, const torch::Tensor& attn_mask, bool causal,
                             int64_t t, int64_t s, int64_t past, torch::ScalarType dtype, torch::Device device) {
  torch::Tensor blocked, added;  // bool [., 1, T | 1, S]; floating [., 1, T, S]
  if (key_padding_mask.defined()) blocked = key_padding_mask.view({key_padding_mask.size(0), 1, 1, s});
  if (attn_mask.defined()) {
    auto m = attn_mask.dim() == 2 ? attn_mask.view({1, 1, t, s}) : attn_mask.view({attn_mask.size(0), 1, t, s});
    if (m.scalar_type() == torch::kBool) blocked = blocked.defined() ? blocked.logical_or(m) : m;
    else added = m.to(dtype);
  }
  if (causal) {
    auto m = torch::ones({t, s}, torch::TensorOptions().dtype(torch::kBool).device(device)).triu(past + 1).view({1, 1, t, s});
    blocked = blocked.defined() ? blocked.logical_or(m) : m;
  }
  if (!blocked.defined()) return added;
  const double fill = mask_fill_value(dtype);
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  return added.defined() ? torch::where(blocked, torch::full({}, fill, options), added)
                         : torch::zeros(blocked.sizes(), options).masked_fill_(blocked, fill);
}

void init_transformer_weights(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  // apply() visits by reference, so this works inside constructors, before
  // the module is owned by a shared_ptr.
  module.apply([](torch::nn::Module& m) {
    if (auto* linear = dynamic_cast<torch::nn::LinearImpl*>(&m)) {
      torch::nn::init::normal_(linear->weight, 0.0, 0.02);
      if (linear->bias.defined()) torch::nn::init::zeros_(linear->bias);
    } else if (auto* embedding = dynamic_cast<torch::nn::EmbeddingImpl*>(&m)) {
      torch::nn::init::normal_(embedding->weight, 0.0, 0.02);
    } else if (auto* norm = dynamic_cast<torch::nn::LayerNormImpl*>(&m)) {
      torch::nn::init::ones_(norm->weight);
      torch::nn::init::zeros_(norm->bias);
    }
  });
}

void init_fan_in_weights(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  module.apply([](torch::nn::Module& m) {
    if (auto* linear = dynamic_cast<torch::nn::LinearImpl*>(&m)) {
      torch::nn::init::normal_(linear->weight, 0.0, 1.0 / std::sqrt(double(linear->weight.size(1))));
      if (linear->bias.defined()) torch::nn::init::zeros_(linear->bias);
    }
  });
}

torch::Tensor masked_mean(const torch::Tensor& tokens, const torch::Tensor& padding_mask) {
  if (!padding_mask.defined()) return tokens.mean(1);
  auto keep = padding_mask.logical_not().unsqueeze(-1).to(tokens.scalar_type());  // [B, N, 1]
  return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0);
}

torch::Tensor check_image_sizes(const torch::Tensor& image_sizes, const torch::Tensor& images, int64_t multiple,
                                const char* who) {
  TORCH_CHECK_TYPE(image_sizes.scalar_type() == torch::kLong, who,
                   ": expected image_sizes of dtype int64 (torch.long), got ", image_sizes.scalar_type());
  TORCH_CHECK_VALUE(image_sizes.dim() == 2 && image_sizes.size(0) == images.size(0) && image_sizes.size(1) == 2, who,
                    ": expected image_sizes of shape [", images.size(0), ", 2] (height, width per image), got ",
                    shape_str(image_sizes));
  auto sizes = image_sizes.to(torch::kCPU).contiguous();
  const auto* s = sizes.data_ptr<int64_t>();
  const int64_t height = images.size(2), width = images.size(3);
  for (int64_t i = 0; i < sizes.size(0); ++i) {
    const int64_t h = s[2 * i], w = s[2 * i + 1];
    TORCH_CHECK_VALUE(h >= 1 && h <= height && w >= 1 && w <= width, who, ": image_sizes[", i, "] = (", h, ", ", w,
                      ") does not fit the padded ", height, "x", width, " batch");
    TORCH_CHECK_VALUE(h % multiple == 0 && w % multiple == 0, who, ": image_sizes[", i, "] = (", h, ", ", w,
                      ") must be multiples of ", multiple,
                      " (resize with data.dynamic_resolution or the Loader's 'dynamic' mode)");
  }
  return sizes;
}

torch::Tensor patch_padding_mask(const torch::Tensor& sizes_cpu, int64_t height, int64_t width, int64_t patch,
                                 torch::Device device) {
  const int64_t b = sizes_cpu.size(0), rows = height / patch, cols = width / patch;
  const auto* s = sizes_cpu.data_ptr<int64_t>();
  bool any = false;
  for (int64_t i = 0; i < b; ++i) any |= s[2 * i] / patch < rows || s[2 * i + 1] / patch < cols;
  if (!any) return {};  // fixed-size batches (the loader reports their sizes too)
  auto mask = torch::ones({b, rows, cols}, torch::kBool);
  for (int64_t i = 0; i < b; ++i) mask[i].slice(0, 0, s[2 * i] / patch).slice(1, 0, s[2 * i + 1] / patch).fill_(false);
  return mask.view({b, rows * cols}).to(device);
}

void check_images(const torch::Tensor& images, int64_t channels, const char* who, const torch::Tensor& like) {
  TORCH_CHECK_TYPE(images.defined(), who, ": expected images of shape [B, ", channels,
                   ", H, W], got an undefined tensor");
  TORCH_CHECK_VALUE(images.dim() == 4 && images.size(1) == channels, who,
                    ": expected images of shape [B, ", channels, ", H, W], got ",
                    shape_str(images));
  TORCH_CHECK_VALUE(images.size(0) > 0 && images.size(2) > 0 && images.size(3) > 0, who,
                    ": expected a non-empty batch of images, got shape ", shape_str(images));
  TORCH_CHECK_TYPE(torch::isFloatingType(images.scalar_type()), who,
                   ": expected floating-point images (float32 or float64), got ",
                   images.scalar_type());
  if (like.defined()) {
    TORCH_CHECK_VALUE(images.device() == like.device(), who, ": expected images on ", like.device(),
                      " (where the model is), got ", images.device());
    TORCH_CHECK_TYPE(images.scalar_type() == like.scalar_type(), who, ": expected images of dtype ",
                     like.scalar_type(), " (the model's), got ", images.scalar_type());
  }
  // One reduction per batch: a NaN or an Inf makes the sum non-finite. The exact
  // element test (five passes; 3% of a training step) runs only when it is, so a
  // sum that overflows on finite values is not an error.
  if (!std::isfinite(images.sum().item<double>()))
    TORCH_CHECK_VALUE(torch::isfinite(images).all().item<bool>(), who, ": images contain NaN or Inf values");
}

torch::Tensor check_token_ids(const torch::Tensor& ids, const torch::Tensor& padding_mask,
                              int64_t vocab_size, int64_t max_len, int64_t pad_id,
                              const char* who) {
  TORCH_CHECK_TYPE(ids.defined(), who, ": expected token_ids of shape [B, T], got undefined");
  TORCH_CHECK_TYPE(ids.scalar_type() == torch::kLong, who,
                   ": expected token_ids of dtype int64 (torch.long), got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2, who, ": expected token_ids of shape [B, T], got ",
                    shape_str(ids));
  TORCH_CHECK_VALUE(ids.size(0) > 0 && ids.size(1) > 0, who,
                    ": expected a non-empty batch of token ids, got shape ", shape_str(ids));
  TORCH_CHECK_VALUE(ids.size(1) <= max_len, who, ": sequence length ", ids.size(1),
                    " exceeds max_len ", max_len);
  const int64_t lo = ids.min().item<int64_t>();
  const int64_t hi = ids.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < vocab_size, who, ": token ids must be in [0, ", vocab_size,
                    "), got values in [", lo, ", ", hi, "]");
  if (!padding_mask.defined()) return ids.eq(pad_id);
  TORCH_CHECK_TYPE(padding_mask.scalar_type() == torch::kBool, who,
                   ": expected padding_mask of dtype bool (true = padding), got ",
                   padding_mask.scalar_type());
  TORCH_CHECK_VALUE(padding_mask.sizes() == ids.sizes(), who, ": expected padding_mask of shape ",
                    shape_str(ids), ", got ", shape_str(padding_mask));
  return padding_mask;
}

namespace {
// cos and sin of the rotary angles [B, 1, T, Dh/2] for one positions tensor.
// Every layer's q and k rotate by the same positions (the decoder passes one
// tensor to all its layers), so the table of the last call is kept and reused
// while the same positions tensor, unmodified, comes back with the same
// width, theta and dtype. The kept tensor holds a reference, so its address
// cannot be taken by another tensor while it is the key. CPU only: a CUDA
// tensor in a thread_local would be freed after CUDA has shut down at exit.
struct RotaryTable {
  torch::Tensor positions;  // the key (a reference: its impl stays alive)
  int64_t version = 0;
  int64_t dh = 0;
  double theta = 0;
  at::ScalarType dtype = at::kFloat;
  torch::Tensor cos, sin;
};

std::pair<torch::Tensor, torch::Tensor> rotary_cos_sin(const torch::Tensor& positions, int64_t dh, double theta,
                                                       at::ScalarType dtype, const torch::Device& device) {
  thread_local RotaryTable kept;
  const bool keep = device.is_cpu();
  if (keep && kept.positions.defined() && kept.positions.unsafeGetTensorImpl() == positions.unsafeGetTensorImpl() &&
      kept.version == positions._version() && kept.dh == dh && kept.theta == theta && kept.dtype == dtype)
    return {kept.cos, kept.sin};
  const int64_t half = dh / 2;
  auto inv_freq = 1.0 / torch::pow(theta, torch::arange(0, half, torch::TensorOptions()
                                                                        .dtype(torch::kDouble)
                                                                        .device(device)) *
                                              (2.0 / double(dh)));
  auto angles = positions.to(torch::kDouble).unsqueeze(-1) * inv_freq;  // [B, T, Dh/2]
  auto cos = angles.cos().to(dtype).unsqueeze(1);                       // [B, 1, T, Dh/2]
  auto sin = angles.sin().to(dtype).unsqueeze(1);
  if (keep) kept = {positions, positions._version(), dh, theta, dtype, cos, sin};
  return {cos, sin};
}
}  // namespace

torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& positions, double theta) {
  const int64_t dh = x.size(-1), half = dh / 2;
  const auto s = x.scalar_type();
  if (x.device().is_cpu() && x.dim() == 4 && attention_kernel() != "aten" &&
      (s == torch::kFloat || s == torch::kBFloat16 || s == torch::kDouble)) {
    // The fused kernel (kernels/attention.h): the table in float32 (float64), one pass.
    const auto acc = s == torch::kDouble ? torch::kDouble : torch::kFloat;
    const auto [cos, sin] = rotary_cos_sin(positions, dh, theta, acc, x.device());
    return kernels::rotary(x, cos, sin);
  }
  const auto [cos, sin] = rotary_cos_sin(positions, dh, theta, s, x.device());
  auto x1 = x.slice(-1, 0, half), x2 = x.slice(-1, half);
  return torch::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
}

torch::Tensor sincos_2d(int64_t rows, int64_t cols, int64_t dim) {
  TORCH_CHECK_VALUE(dim % 4 == 0, "sincos2d position embedding needs a width divisible by 4, got ",
                    dim);
  const int64_t quarter = dim / 4;
  auto omega = torch::arange(quarter, torch::kDouble) / double(quarter);
  omega = 1.0 / torch::pow(10000.0, omega);                                   // [D/4]
  auto ys = torch::arange(rows, torch::kDouble).repeat_interleave(cols);      // [N]
  auto xs = torch::arange(cols, torch::kDouble).repeat({rows});               // [N]
  auto oy = torch::outer(ys, omega), ox = torch::outer(xs, omega);            // [N, D/4]
  return torch::cat({oy.sin(), oy.cos(), ox.sin(), ox.cos()}, 1).to(torch::kFloat);  // [N, D]
}

}  // namespace detail
}  // namespace vlmkit
