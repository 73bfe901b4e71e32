// Non-template building blocks: attention, transformer block, image and text
// encoders, Two-Leg fusion blocks, heads and losses.
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
#include "internal.h"

namespace F = torch::nn::functional;

namespace vlmkit {
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

namespace {
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
}  // namespace

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

torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& positions, double theta) {
  const int64_t dh = x.size(-1), half = dh / 2;
  auto inv_freq = 1.0 / torch::pow(theta, torch::arange(0, half, torch::TensorOptions()
                                                                        .dtype(torch::kDouble)
                                                                        .device(x.device())) *
                                              (2.0 / double(dh)));
  auto angles = positions.to(torch::kDouble).unsqueeze(-1) * inv_freq;  // [B, T, Dh/2]
  auto cos = angles.cos().to(x.scalar_type()).unsqueeze(1);             // [B, 1, T, Dh/2]
  auto sin = angles.sin().to(x.scalar_type()).unsqueeze(1);
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

// ---------------------------------------------------------------- attention
MultiheadAttentionImpl::MultiheadAttentionImpl(MultiheadAttentionOptions options_)
    : options(std::move(options_)) {
  reset();
}

void MultiheadAttentionImpl::reset() {
  detail::check_heads(options.embed_dim(), options.num_heads(), "MultiheadAttention");
  TORCH_CHECK_VALUE(options.dropout() >= 0 && options.dropout() < 1,
                    "MultiheadAttention: dropout must be in [0, 1), got ", options.dropout());
  TORCH_CHECK_VALUE(!options.rotary() || (options.embed_dim() / options.num_heads()) % 2 == 0,
                    "MultiheadAttention: rotary positions need an even head width, got ",
                    options.embed_dim() / options.num_heads());
  const int64_t e = options.embed_dim();
  const int64_t c = options.context_dim() > 0 ? options.context_dim() : e;
  TORCH_CHECK_VALUE(options.num_kv_heads() >= 0, "MultiheadAttention: num_kv_heads must be >= 0 (0: num_heads), got ",
                    options.num_kv_heads());
  const int64_t kv = kv_heads();
  TORCH_CHECK_VALUE(options.num_heads() % kv == 0, "MultiheadAttention: num_kv_heads (", kv,
                    ") must divide num_heads (", options.num_heads(), ")");
  const int64_t kv_dim = kv * (e / options.num_heads());
  q_proj = register_module("q_proj", Linear(torch::nn::LinearOptions(e, e).bias(options.bias())));
  k_proj = register_module("k_proj", Linear(torch::nn::LinearOptions(c, kv_dim).bias(options.bias())));
  v_proj = register_module("v_proj", Linear(torch::nn::LinearOptions(c, kv_dim).bias(options.bias())));
  out_proj = register_module("out_proj", Linear(torch::nn::LinearOptions(e, e).bias(options.bias())));
  if (options.qk_norm()) {
    q_norm = register_module("q_norm", Norm(e / options.num_heads(), NormType::rmsnorm, 1e-6));
    k_norm = register_module("k_norm", Norm(e / options.num_heads(), NormType::rmsnorm, 1e-6));
  }
}

void MultiheadAttentionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::MultiheadAttention", options_to_json(options));
}

torch::Tensor MultiheadAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context,
                                              const torch::Tensor& key_padding_mask,
                                              const torch::Tensor& attn_mask, bool causal,
                                              KVCache* cache, const torch::Tensor& positions) {
  const int64_t e = options.embed_dim(), h = options.num_heads(), dh = e / h;
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 3 && x.size(2) == e,
                    "MultiheadAttention: expected x of shape [B, T, ", e, "], got ",
                    x.defined() ? detail::shape_str(x) : std::string("undefined"));
  const int64_t b = x.size(0), t = x.size(1), kv = kv_heads();
  const bool cross = context.defined();
  auto q = q_proj->forward(x).view({b, t, h, dh}).transpose(1, 2);  // [B, H, T, Dh]
  if (q_norm) q = q_norm->forward(q);
  torch::Tensor k, v;
  if (cross && cache && !cache->empty()) {
    k = cache->key;
    v = cache->value;
  } else {
    const auto& source = cross ? context : x;
    if (cross) {
      const int64_t c = options.context_dim() > 0 ? options.context_dim() : e;
      TORCH_CHECK_VALUE(context.dim() == 3 && context.size(0) == b && context.size(2) == c,
                        "MultiheadAttention: expected context of shape [", b, ", S, ", c,
                        "], got ", detail::shape_str(context));
    }
    const int64_t s = source.size(1);
    k = k_proj->forward(source).view({b, s, kv, dh}).transpose(1, 2);  // [B, Hkv, S, Dh]
    v = v_proj->forward(source).view({b, s, kv, dh}).transpose(1, 2);
    if (k_norm) k = k_norm->forward(k);
    if (options.rotary() && !cross) {
      torch::Tensor pos = positions;
      if (!pos.defined()) {
        const int64_t past = cache ? cache->length() : 0;
        pos = torch::arange(past, past + t, torch::TensorOptions().dtype(torch::kLong).device(x.device()))
                  .unsqueeze(0)
                  .expand({b, t});
      }
      TORCH_CHECK_VALUE(pos.dim() == 2 && pos.size(0) == b && pos.size(1) == t,
                        "MultiheadAttention: expected positions of shape [", b, ", ", t, "], got ",
                        detail::shape_str(pos));
      q = detail::apply_rotary(q, pos, options.rope_theta());
      k = detail::apply_rotary(k, pos, options.rope_theta());
    }
    if (cache) {
      if (!cross && !cache->empty()) {
        k = torch::cat({cache->key, k}, 2);
        v = torch::cat({cache->value, v}, 2);
      }
      cache->key = k;
      cache->value = v;
    }
  }
  const int64_t s = k.size(2);
  const int64_t past = cross ? 0 : s - t;
  if (kv != h) {  // grouped-query: each key/value head serves h / kv query heads
    k = k.repeat_interleave(h / kv, 1);
    v = v.repeat_interleave(h / kv, 1);
  }

  if (key_padding_mask.defined()) {
    TORCH_CHECK_TYPE(key_padding_mask.scalar_type() == torch::kBool,
                     "MultiheadAttention: expected key_padding_mask of dtype bool, got ",
                     key_padding_mask.scalar_type());
    TORCH_CHECK_VALUE(key_padding_mask.dim() == 2 && key_padding_mask.size(0) == b &&
                          key_padding_mask.size(1) == s,
                      "MultiheadAttention: expected key_padding_mask of shape [", b, ", ", s,
                      "], got ", detail::shape_str(key_padding_mask));
  }
  if (attn_mask.defined()) {
    TORCH_CHECK_TYPE(attn_mask.scalar_type() == torch::kBool || attn_mask.is_floating_point(),
                     "MultiheadAttention: expected attn_mask of dtype bool (true = blocked) or floating (added "
                     "to the scores), got ", attn_mask.scalar_type());
    TORCH_CHECK_VALUE((attn_mask.dim() == 2 && attn_mask.size(0) == t && attn_mask.size(1) == s) ||
                          (attn_mask.dim() == 3 && attn_mask.size(0) == b &&
                           attn_mask.size(1) == t && attn_mask.size(2) == s),
                      "MultiheadAttention: expected attn_mask of shape [", t, ", ", s, "] or [",
                      b, ", ", t, ", ", s, "], got ", detail::shape_str(attn_mask));
  }
  const auto additive =
      detail::attention_bias(key_padding_mask, attn_mask, causal, t, s, past, q.scalar_type(), q.device());

  const double dropout_p = is_training() ? options.dropout() : 0.0;
  torch::Tensor out;
#if TORCH_VERSION_MAJOR >= 2
  // An undefined tensor is not "no mask" for SDPA: pass an empty optional.
  out = at::scaled_dot_product_attention(q, k, v,
                                         additive.defined() ? c10::optional<torch::Tensor>(additive) : c10::nullopt,
                                         dropout_p, false);
#else
  // The scale goes on q ([T, Dh]) rather than on the scores ([T, S]), and the
  // mask is added in place: two passes over [B, H, T, S] fewer.
  auto scores = torch::matmul(q * (1.0 / std::sqrt(double(dh))), k.transpose(-2, -1));
  if (additive.defined()) scores.add_(additive);
  auto weights = scores.softmax(-1);
  if (dropout_p > 0) weights = F::dropout(weights, F::DropoutFuncOptions().p(dropout_p).training(true));
  out = torch::matmul(weights, v);
#endif
  return out_proj->forward(out.transpose(1, 2).reshape({b, t, e}));
}

// ---------------------------------------------------------------- autocast scope
namespace detail {
AutocastState AutocastState::current() {
  return {at::autocast::is_cpu_enabled(), at::autocast::get_autocast_cpu_dtype(), at::autocast::is_enabled(),
          at::autocast::get_autocast_gpu_dtype()};
}

namespace {
void apply_autocast(const AutocastState& s) {
  at::autocast::set_cpu_enabled(s.cpu_enabled);
  at::autocast::set_autocast_cpu_dtype(s.cpu_dtype);
  at::autocast::set_enabled(s.cuda_enabled);
  at::autocast::set_autocast_gpu_dtype(s.cuda_dtype);
}
}  // namespace

Autocast::Autocast(const AutocastState& state) : saved_(AutocastState::current()) {
  apply_autocast(state);
  at::autocast::increment_nesting();
}

Autocast::Autocast(const torch::Device& device, torch::ScalarType dtype) : saved_(AutocastState::current()) {
  auto state = saved_;
  if (device.is_cuda()) {
    state.cuda_enabled = true;
    state.cuda_dtype = dtype;
  } else {
    state.cpu_enabled = true;
    state.cpu_dtype = dtype;
  }
  apply_autocast(state);
  at::autocast::increment_nesting();
}

Autocast::~Autocast() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  apply_autocast(saved_);
}
}  // namespace detail

// ---------------------------------------------------------------- activation checkpointing
namespace detail {
namespace {
using BlockFn = std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>;

struct BlockHolder : torch::CustomClassHolder {
  explicit BlockHolder(BlockFn f) : fn(std::move(f)) {}
  BlockFn fn;
};

struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& context, c10::intrusive_ptr<BlockHolder> holder) {
    auto gen = at::detail::getDefaultCPUGenerator();
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      ctx->saved_data["rng"] = gen.get_state();
    }
    const bool has_context = context.numel() > 0;
    // The recomputation must see the forward's autocast (bf16 training).
    const auto autocast = AutocastState::current();
    ctx->saved_data["autocast_cpu"] = autocast.cpu_enabled;
    ctx->saved_data["autocast_cpu_dtype"] = static_cast<int64_t>(autocast.cpu_dtype);
    ctx->saved_data["autocast_cuda"] = autocast.cuda_enabled;
    ctx->saved_data["autocast_cuda_dtype"] = static_cast<int64_t>(autocast.cuda_dtype);
    ctx->saved_data["block"] = c10::IValue::make_capsule(holder);
    ctx->saved_data["has_context"] = has_context;
    ctx->save_for_backward({x, context});
    torch::NoGradGuard no_grad;  // nothing of the block's graph is kept
    return holder->fn(x, has_context ? context : torch::Tensor());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto holder = c10::static_intrusive_pointer_cast<BlockHolder>(ctx->saved_data["block"].toCapsule());
    const bool has_context = ctx->saved_data["has_context"].toBool();
    auto x = saved[0].detach().requires_grad_(true);
    torch::Tensor context;
    if (has_context) context = saved[1].detach().requires_grad_(saved[1].requires_grad());
    auto gen = at::detail::getDefaultCPUGenerator();
    torch::Tensor rng_now;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng_now = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());
    }
    torch::Tensor y;
    {
      torch::AutoGradMode enable(true);
      Autocast replay({ctx->saved_data["autocast_cpu"].toBool(),
                       static_cast<at::ScalarType>(ctx->saved_data["autocast_cpu_dtype"].toInt()),
                       ctx->saved_data["autocast_cuda"].toBool(),
                       static_cast<at::ScalarType>(ctx->saved_data["autocast_cuda_dtype"].toInt())});
      y = holder->fn(x, context);
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng_now);
    }
    // Re-entrant backward: parameter gradients accumulate as in an ordinary backward.
    torch::autograd::backward({y}, {grads[0]});
    return {x.grad(), has_context && context.requires_grad() ? context.grad() : torch::Tensor(), torch::Tensor()};
  }
};
}  // namespace

torch::Tensor checkpoint(const BlockFn& block, const torch::Tensor& x, const torch::Tensor& context) {
  // A frozen input (LoRA: frozen embeddings) would leave the output without a
  // graph and the block's own trainable parameters without gradients.
  auto input = x.requires_grad() ? x : x.detach().requires_grad_(true);
  // No context: an empty stand-in (custom autograd functions take defined tensors only).
  return CheckpointFunction::apply(input, context.defined() ? context : x.new_empty({0}),
                                   c10::make_intrusive<BlockHolder>(block));
}

torch::Tensor run_encoder_blocks(torch::nn::ModuleList& blocks, torch::Tensor x, const torch::Tensor& key_padding_mask,
                                 bool checkpointing) {
  const bool recompute = checkpointing && torch::GradMode::is_enabled();
  for (const auto& block : *blocks) {
    auto* layer = block->as<TransformerBlockImpl>();
    x = recompute ? checkpoint([layer, key_padding_mask](const torch::Tensor& h, const torch::Tensor&) {
                      return layer->forward(h, key_padding_mask);
                    }, x, {})
                  : layer->forward(x, key_padding_mask);
  }
  return x;
}
}  // namespace detail

// ---------------------------------------------------------------- norm
namespace detail {
namespace {
/// Under autocast a norm receives low-precision activations beside its float32
/// weights; LibTorch 1.13's autocast does not cast for layer_norm or group_norm,
/// so normalise in the weights' precision. Outside autocast a dtype mismatch is
/// left to fail as it does in torch.
torch::Tensor in_weight_precision(const torch::Tensor& input, const torch::Tensor& weight) {
  const bool autocast = at::autocast::is_cpu_enabled() || at::autocast::is_enabled();
  return autocast && input.scalar_type() != weight.scalar_type() ? input.to(weight.scalar_type()) : input;
}
}  // namespace

torch::Tensor GroupNormImpl::forward(const torch::Tensor& input) {
  return torch::nn::GroupNormImpl::forward(in_weight_precision(input, weight));
}
}  // namespace detail

NormImpl::NormImpl(int64_t dim_, NormType type_, double eps_) : dim(dim_), type(type_), eps(eps_) { reset(); }

void NormImpl::reset() {
  TORCH_CHECK_VALUE(dim >= 1, "Norm: dim must be >= 1, got ", dim);
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "Norm: eps must be a positive number, got ", eps);
  weight = register_parameter("weight", torch::ones({dim}));
  if (type == NormType::layernorm) bias = register_parameter("bias", torch::zeros({dim}));
}

void NormImpl::pretty_print(std::ostream& stream) const {
  stream << "vlmkit::Norm(" << to_name(type) << ", " << dim << ", eps=" << eps << ")";
}

torch::Tensor NormImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK_VALUE(input.defined() && input.dim() >= 1 && input.size(-1) == dim, "Norm: expected [..., ", dim,
                    "], got ", detail::shape_str(input));
  const auto x = detail::in_weight_precision(input, weight);
  if (type == NormType::layernorm) return torch::layer_norm(x, {dim}, weight, bias, eps);
  const bool low = x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16;
  const auto xf = low ? x.to(torch::kFloat) : x;
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (low ? y.to(x.scalar_type()) : y) * weight;
}

// ---------------------------------------------------------------- transformer block
TransformerBlockImpl::TransformerBlockImpl(TransformerBlockOptions options_)
    : options(std::move(options_)) {
  reset();
}

void TransformerBlockImpl::reset() {
  const int64_t d = options.d_model();
  detail::check_heads(d, options.num_heads(), "TransformerBlock");
  TORCH_CHECK_VALUE(options.mlp_ratio() > 0, "TransformerBlock: mlp_ratio must be positive, got ",
                    options.mlp_ratio());
  TORCH_CHECK_VALUE(options.dropout() >= 0 && options.dropout() < 1,
                    "TransformerBlock: dropout must be in [0, 1), got ", options.dropout());
  norm1 = register_module("norm1", Norm(d, options.norm(), options.norm_eps()));
  self_attn = register_module(
      "self_attn",
      MultiheadAttention(MultiheadAttentionOptions(d, options.num_heads())
                             .dropout(options.dropout())
                             .rotary(options.rotary())
                             .rope_theta(options.rope_theta())
                             .num_kv_heads(options.num_kv_heads())
                             .qk_norm(options.qk_norm())));
  if (options.cross_attention()) {
    norm_cross = register_module("norm_cross", Norm(d, options.norm(), options.norm_eps()));
    cross_attn = register_module(
        "cross_attn", MultiheadAttention(MultiheadAttentionOptions(d, options.num_heads())
                                             .context_dim(options.context_dim())
                                             .dropout(options.dropout())));
    if (options.gated_cross_attention())
      cross_gate = register_parameter("cross_gate", torch::zeros({1}));
  }
  norm2 = register_module("norm2", Norm(d, options.norm(), options.norm_eps()));
  const auto hidden = static_cast<int64_t>(std::llround(d * options.mlp_ratio()));
  if (options.mlp() == MlpType::swiglu) {
    const auto no_bias = [](int64_t in, int64_t out) { return Linear(torch::nn::LinearOptions(in, out).bias(false)); };
    gate_proj = register_module("gate_proj", no_bias(d, hidden));
    up_proj = register_module("up_proj", no_bias(d, hidden));
    down_proj = register_module("down_proj", no_bias(hidden, d));
  } else {
    fc1 = register_module("fc1", Linear(d, hidden));
    fc2 = register_module("fc2", Linear(hidden, d));
  }
  dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
  detail::init_transformer_weights(*this);
}

void TransformerBlockImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::TransformerBlock", options_to_json(options));
}

torch::Tensor TransformerBlockImpl::forward(const torch::Tensor& x,
                                            const torch::Tensor& key_padding_mask,
                                            const torch::Tensor& attn_mask, bool causal,
                                            const torch::Tensor& context,
                                            const torch::Tensor& context_padding_mask,
                                            BlockCache* cache, const torch::Tensor& positions) {
  auto h = x + dropout->forward(self_attn->forward(norm1->forward(x), {}, key_padding_mask,
                                                   attn_mask, causal,
                                                   cache ? &cache->self : nullptr, positions));
  if (options.cross_attention()) {
    TORCH_CHECK_VALUE(context.defined(),
                      "TransformerBlock: this block has cross-attention and needs a context of "
                      "shape [B, N, D]");
    // [B, T, N]: a per-query mask (packed rows), else [B, N] key padding.
    const bool per_query = context_padding_mask.defined() && context_padding_mask.dim() == 3;
    auto c = cross_attn->forward(norm_cross->forward(h), context, per_query ? torch::Tensor() : context_padding_mask,
                                 per_query ? context_padding_mask : torch::Tensor(), false,
                                 cache ? &cache->cross : nullptr);
    if (cross_gate.defined()) c = torch::tanh(cross_gate) * c;
    h = h + dropout->forward(c);
  }
  const auto n = norm2->forward(h);
  auto m = options.mlp() == MlpType::swiglu
               ? down_proj->forward(dropout->forward(torch::silu(gate_proj->forward(n)) * up_proj->forward(n)))
               : fc2->forward(dropout->forward(torch::gelu(fc1->forward(n))));
  return h + dropout->forward(m);
}

// ---------------------------------------------------------------- conv stage
ConvStageImpl::ConvStageImpl(ConvStageOptions options_)
    : ImageEncoderModule("vlmkit::ConvStage"), options(std::move(options_)) {
  reset();
}

void ConvStageImpl::reset() {
  TORCH_CHECK_VALUE(!options.channels().empty(),
                    "ConvStage: channels must list at least one stage, got []");
  TORCH_CHECK_VALUE(options.in_channels() > 0 && options.d_model() > 0,
                    "ConvStage: in_channels and d_model must be positive, got ",
                    options.in_channels(), " and ", options.d_model());
  TORCH_CHECK_VALUE(options.image_size() > 0 && options.image_size() % downsample() == 0,
                    "ConvStage: image_size ", options.image_size(),
                    " must be a positive multiple of the downsampling factor ", downsample(),
                    " (2^", options.channels().size(), " stages)");
  stages = torch::nn::Sequential();
  int64_t in = options.in_channels();
  for (int64_t c : options.channels()) {
    TORCH_CHECK_VALUE(c > 0, "ConvStage: channel counts must be positive, got ", c);
    // No conv bias: the GroupNorm that follows removes it anyway.
    stages->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, c, 3).stride(2).padding(1).bias(false)));
    stages->push_back(detail::GroupNorm(torch::nn::GroupNormOptions(std::gcd<int64_t>(8, c), c)));
    stages->push_back(torch::nn::GELU());
    in = c;
  }
  stages = register_module("stages", stages);
  // A 1x1 convolution rather than a Linear on transposed tokens: LibTorch 1.13's
  // float32 GELU backward returns wrong values (even NaN) when its incoming
  // gradient is a transposed view, which a Linear after flatten/transpose
  // produces. The 1x1 conv hands the last GELU a contiguous NCHW gradient.
  proj = register_module("proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(in, options.d_model(), 1)));
  norm = register_module("norm", Norm(options.d_model()));
  detail::init_transformer_weights(*this);
}

void ConvStageImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::ConvStage", options_to_json(options));
}

json ConvStageImpl::config() const {
  auto out = options_to_json(options);
  out["type"] = "conv";
  return out;
}

torch::Tensor ConvStageImpl::features(const torch::Tensor& images) {
  detail::check_images(images, options.in_channels(), "ConvStage", proj->weight);
  const int64_t s = downsample();
  TORCH_CHECK_VALUE(images.size(2) % s == 0 && images.size(3) % s == 0,
                    "ConvStage: expected image height and width to be multiples of ", s,
                    ", got ", images.size(2), "x", images.size(3));
  return stages->forward(images);
}

EncoderOutput ImageEncoderModule::forward(const torch::Tensor& images, const torch::Tensor& image_sizes) {
  // Sizes that all fill the batch (fixed-size loaders report them too) are fine.
  const bool padded = image_sizes.defined() &&
                      detail::patch_padding_mask(detail::check_image_sizes(image_sizes, images, 1, name().c_str()),
                                                 images.size(2), images.size(3), 1, torch::kCPU)
                          .defined();
  TORCH_CHECK_VALUE(!padded, name(),
                    ": variable-size images (image_sizes) are not supported by this encoder; use the ViT "
                    "(it masks padded patches) or resize every image to one size");
  return forward(images);
}

EncoderOutput ConvStageImpl::forward(const torch::Tensor& images) {
  auto f = features(images);  // [B, C, r, c]
  EncoderOutput out;
  out.grid = {f.size(2), f.size(3)};
  out.tokens = norm->forward(proj->forward(f).flatten(2).transpose(1, 2));  // [B, r*c, D]
  out.pooled = out.tokens.mean(1);
  return out;
}

// ---------------------------------------------------------------- ViT
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

json ViTImpl::config() const {
  auto out = options_to_json(options);
  out["type"] = "vit";
  return out;
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
    x = conv_stem->forward(images).tokens;
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

// ---------------------------------------------------------------- text encoder
TextEncoderImpl::TextEncoderImpl(TextEncoderOptions options_)
    : TextEncoderModule("vlmkit::TextEncoder"), options(std::move(options_)) {
  reset();
}

void TextEncoderImpl::reset() {
  const int64_t d = options.d_model();
  detail::check_heads(d, options.num_heads(), "TextEncoder");
  TORCH_CHECK_VALUE(options.vocab_size() > 0 && options.max_len() > 0,
                    "TextEncoder: vocab_size and max_len must be positive, got ",
                    options.vocab_size(), " and ", options.max_len());
  TORCH_CHECK_VALUE(options.pad_id() >= 0 && options.pad_id() < options.vocab_size(),
                    "TextEncoder: pad_id must be in [0, vocab_size=", options.vocab_size(),
                    "), got ", options.pad_id());
  TORCH_CHECK_VALUE(options.depth() >= 0, "TextEncoder: depth must be >= 0, got ", options.depth());
  token_embed = register_module("token_embed", torch::nn::Embedding(options.vocab_size(), d));
  pos_embed = register_parameter("pos_embed", torch::randn({1, options.max_len(), d}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.depth(); ++i)
    blocks->push_back(TransformerBlock(TransformerBlockOptions(d, options.num_heads())
                                           .mlp_ratio(options.mlp_ratio())
                                           .dropout(options.dropout())
                                           .norm(options.norm())
                                           .mlp(options.mlp())));
  norm = register_module("norm", Norm(d, options.norm()));
  detail::init_transformer_weights(*this);
}

void TextEncoderImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::TextEncoder", options_to_json(options));
}

json TextEncoderImpl::config() const {
  auto out = options_to_json(options);
  out["type"] = "transformer";
  return out;
}

torch::Tensor TextEncoderImpl::check_ids(const torch::Tensor& token_ids,
                                         const torch::Tensor& padding_mask) const {
  return detail::check_token_ids(token_ids, padding_mask, options.vocab_size(), options.max_len(),
                                 options.pad_id(), "TextEncoder");
}

torch::Tensor TextEncoderImpl::embed(const torch::Tensor& token_ids) {
  return token_embed->forward(token_ids) + pos_embed.slice(1, 0, token_ids.size(1));
}

torch::Tensor TextEncoderImpl::encode(const torch::Tensor& embeds, const torch::Tensor& padding_mask) {
  return norm->forward(
      detail::run_encoder_blocks(blocks, embeds, padding_mask, options.activation_checkpointing() && is_training()));
}

EncoderOutput TextEncoderImpl::forward(const torch::Tensor& token_ids,
                                       const torch::Tensor& padding_mask) {
  auto mask = check_ids(token_ids, padding_mask);
  const int64_t t = token_ids.size(1);
  auto x = encode(embed(token_ids), mask);
  EncoderOutput out;
  out.tokens = x;
  out.padding_mask = mask;
  switch (options.pool()) {
    case TextPool::mean: out.pooled = detail::masked_mean(x, mask); break;
    case TextPool::cls: out.pooled = x.select(1, 0); break;
    case TextPool::last: {
      // Index of the last non-padding position, whatever the padding side.
      auto positions = torch::arange(t, token_ids.options()).unsqueeze(0) *
                       mask.logical_not().to(torch::kLong);
      auto last = positions.argmax(1);  // [B]
      out.pooled = x.gather(1, last.view({-1, 1, 1}).expand({-1, 1, x.size(2)})).squeeze(1);
      break;
    }
  }
  return out;
}

// ---------------------------------------------------------------- fusion
FusionRegistry& fusion_registry() {
  static FusionRegistry registry("fusion type");
  return registry;
}

VLMKIT_REGISTER_FUSION(ConcatMlpFusionImpl, "ConcatMlpFusion", "concat(pooled image, pooled text) -> MLP -> [B, dim]")
VLMKIT_REGISTER_FUSION(AttentionFusionImpl, "AttentionFusion", "softmax-weighted sum over modalities -> [B, dim]")
VLMKIT_REGISTER_FUSION(GatedFusionImpl, "GatedFusion", "gated multimodal unit (Arevalo et al. 2017) -> [B, dim]")
VLMKIT_REGISTER_FUSION(CrossAttentionFusionImpl, "CrossAttentionFusion",
                       "text tokens cross-attend to image tokens, masked mean -> [B, dim]")

ConcatMlpFusionImpl::ConcatMlpFusionImpl(ConcatMlpFusionOptions options_)
    : FusionModule("vlmkit::ConcatMlpFusion"), options(std::move(options_)) {
  reset();
}

void ConcatMlpFusionImpl::reset() {
  TORCH_CHECK_VALUE(options.image_dim() > 0 && options.text_dim() > 0 && options.dim() > 0,
                    "ConcatMlpFusion: widths must be positive");
  const int64_t hidden = options.hidden_dim() > 0 ? options.hidden_dim() : options.dim();
  fc1 = register_module("fc1", Linear(options.image_dim() + options.text_dim(), hidden));
  fc2 = register_module("fc2", Linear(hidden, options.dim()));
  dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
  detail::init_transformer_weights(*this);
}

void ConcatMlpFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::ConcatMlpFusion", options_to_json(options));
}

torch::Tensor ConcatMlpFusionImpl::forward(const EncoderOutput& image, const EncoderOutput& text) {
  detail::check_pooled(image, options.image_dim(), "ConcatMlpFusion", "image");
  detail::check_pooled(text, options.text_dim(), "ConcatMlpFusion", "text");
  auto x = torch::cat({image.pooled, text.pooled}, 1);
  return fc2->forward(dropout->forward(torch::gelu(fc1->forward(x))));
}

AttentionFusionImpl::AttentionFusionImpl(AttentionFusionOptions options_)
    : FusionModule("vlmkit::AttentionFusion"), options(std::move(options_)) {
  reset();
}

void AttentionFusionImpl::reset() {
  TORCH_CHECK_VALUE(options.image_dim() > 0 && options.text_dim() > 0 && options.dim() > 0,
                    "AttentionFusion: widths must be positive");
  const int64_t hidden = options.hidden_dim() > 0 ? options.hidden_dim() : options.dim();
  image_proj = register_module("image_proj", Linear(options.image_dim(), options.dim()));
  text_proj = register_module("text_proj", Linear(options.text_dim(), options.dim()));
  score_hidden = register_module("score_hidden", Linear(options.dim(), hidden));
  score_out = register_module(
      "score_out", Linear(torch::nn::LinearOptions(hidden, 1).bias(false)));
  detail::init_transformer_weights(*this);
}

void AttentionFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::AttentionFusion", options_to_json(options));
}

torch::Tensor AttentionFusionImpl::forward(const EncoderOutput& image, const EncoderOutput& text) {
  detail::check_pooled(image, options.image_dim(), "AttentionFusion", "image");
  detail::check_pooled(text, options.text_dim(), "AttentionFusion", "text");
  auto h = torch::stack({image_proj->forward(image.pooled), text_proj->forward(text.pooled)}, 1);  // [B, 2, D]
  auto weights = score_out->forward(torch::tanh(score_hidden->forward(h))).softmax(1);  // [B, 2, 1]
  last_weights_ = weights.squeeze(-1).detach();
  return (weights * h).sum(1);
}

GatedFusionImpl::GatedFusionImpl(GatedFusionOptions options_)
    : FusionModule("vlmkit::GatedFusion"), options(std::move(options_)) {
  reset();
}

void GatedFusionImpl::reset() {
  TORCH_CHECK_VALUE(options.image_dim() > 0 && options.text_dim() > 0 && options.dim() > 0,
                    "GatedFusion: widths must be positive");
  image_proj = register_module("image_proj", Linear(options.image_dim(), options.dim()));
  text_proj = register_module("text_proj", Linear(options.text_dim(), options.dim()));
  gate = register_module("gate", Linear(options.image_dim() + options.text_dim(), options.dim()));
  detail::init_transformer_weights(*this);
}

void GatedFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::GatedFusion", options_to_json(options));
}

torch::Tensor GatedFusionImpl::forward(const EncoderOutput& image, const EncoderOutput& text) {
  detail::check_pooled(image, options.image_dim(), "GatedFusion", "image");
  detail::check_pooled(text, options.text_dim(), "GatedFusion", "text");
  auto z = torch::sigmoid(gate->forward(torch::cat({image.pooled, text.pooled}, 1)));
  return z * torch::tanh(image_proj->forward(image.pooled)) +
         (1 - z) * torch::tanh(text_proj->forward(text.pooled));
}

CrossAttentionFusionImpl::CrossAttentionFusionImpl(CrossAttentionFusionOptions options_)
    : FusionModule("vlmkit::CrossAttentionFusion"), options(std::move(options_)) {
  reset();
}

void CrossAttentionFusionImpl::reset() {
  detail::check_heads(options.dim(), options.num_heads(), "CrossAttentionFusion");
  TORCH_CHECK_VALUE(options.num_layers() >= 1, "CrossAttentionFusion: num_layers must be >= 1, got ",
                    options.num_layers());
  if (options.text_dim() != options.dim())
    text_proj = register_module("text_proj", Linear(options.text_dim(), options.dim()));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.num_layers(); ++i)
    blocks->push_back(TransformerBlock(TransformerBlockOptions(options.dim(), options.num_heads())
                                           .mlp_ratio(options.mlp_ratio())
                                           .dropout(options.dropout())
                                           .cross_attention(true)
                                           .context_dim(options.image_dim())));
  norm = register_module("norm", Norm(options.dim()));
  detail::init_transformer_weights(*this);
}

void CrossAttentionFusionImpl::pretty_print(std::ostream& stream) const {
  detail::print_options(stream, "vlmkit::CrossAttentionFusion", options_to_json(options));
}

torch::Tensor CrossAttentionFusionImpl::forward(const EncoderOutput& image,
                                                const EncoderOutput& text) {
  detail::check_tokens(image, options.image_dim(), "CrossAttentionFusion", "image");
  detail::check_tokens(text, options.text_dim(), "CrossAttentionFusion", "text");
  TORCH_CHECK_VALUE(image.tokens.size(0) == text.tokens.size(0),
                    "CrossAttentionFusion: expected the same batch size for image and text, got ",
                    image.tokens.size(0), " and ", text.tokens.size(0));
  auto x = text_proj ? text_proj->forward(text.tokens) : text.tokens;
  for (const auto& block : *blocks)
    x = block->as<TransformerBlockImpl>()->forward(x, text.padding_mask, {}, false, image.tokens,
                                                   image.padding_mask);
  return detail::masked_mean(norm->forward(x), text.padding_mask);
}

// ---------------------------------------------------------------- heads
ClassificationHeadImpl::ClassificationHeadImpl(ClassificationHeadOptions options_)
    : options(std::move(options_)) {
  reset();
}

void ClassificationHeadImpl::reset() {
  TORCH_CHECK_VALUE(options.in_dim() > 0 && options.num_classes() > 0,
                    "ClassificationHead: in_dim and num_classes must be positive, got ",
                    options.in_dim(), " and ", options.num_classes());
  int64_t in = options.in_dim();
  if (options.hidden_dim() > 0) {
    hidden = register_module("hidden", Linear(in, options.hidden_dim()));
    in = options.hidden_dim();
  }
  dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
  out = register_module("out", Linear(in, options.num_classes()));
  detail::init_transformer_weights(*this);
}

void ClassificationHeadImpl::pretty_print(std::ostream& stream) const {
  json fields = options_to_json(options);
  fields["in_dim"] = options.in_dim();
  detail::print_options(stream, "vlmkit::ClassificationHead", fields);
}

torch::Tensor ClassificationHeadImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 2 && x.size(1) == options.in_dim(),
                    "ClassificationHead: expected input of shape [B, ", options.in_dim(),
                    "], got ", x.defined() ? detail::shape_str(x) : std::string("undefined"));
  auto h = x;
  if (hidden) h = dropout->forward(torch::gelu(hidden->forward(h)));
  return out->forward(h);
}

// ---------------------------------------------------------------- losses
namespace {
void check_square_logits(const torch::Tensor& logits, const char* who) {
  TORCH_CHECK_VALUE(logits.defined() && logits.dim() == 2 && logits.size(0) == logits.size(1) &&
                        logits.size(0) > 0,
                    who, ": expected square logits [B, B] with B >= 1, got ",
                    logits.defined() ? detail::shape_str(logits) : std::string("undefined"));
}
}  // namespace

torch::Tensor clip_loss(const torch::Tensor& logits_per_image) {
  check_square_logits(logits_per_image, "clip_loss");
  auto labels = torch::arange(logits_per_image.size(0),
                              torch::TensorOptions().dtype(torch::kLong).device(logits_per_image.device()));
  return 0.5 * (F::cross_entropy(logits_per_image, labels) +
                F::cross_entropy(logits_per_image.t(), labels));
}

torch::Tensor siglip_loss(const torch::Tensor& logits_per_image) {
  check_square_logits(logits_per_image, "siglip_loss");
  const int64_t b = logits_per_image.size(0);
  auto signs = 2 * torch::eye(b, logits_per_image.options()) - 1;
  return -F::logsigmoid(signs * logits_per_image).sum() / double(b);
}

torch::Tensor classification_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                                  double label_smoothing) {
  TORCH_CHECK_VALUE(logits.defined() && logits.dim() == 2,
                    "classification_loss: expected logits of shape [B, C], got ",
                    logits.defined() ? detail::shape_str(logits) : std::string("undefined"));
  TORCH_CHECK_TYPE(labels.defined() && labels.scalar_type() == torch::kLong,
                   "classification_loss: expected int64 class labels, got ",
                   labels.defined() ? c10::toString(labels.scalar_type()) : "undefined");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0),
                    "classification_loss: expected labels of shape [", logits.size(0), "], got ",
                    detail::shape_str(labels));
  if (labels.numel() > 0) {
    const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < logits.size(1), "classification_loss: labels must be in [0, ",
                      logits.size(1), "), got values in [", lo, ", ", hi, "]");
  }
  return F::cross_entropy(logits, labels,
                          F::CrossEntropyFuncOptions().label_smoothing(label_smoothing));
}

torch::Tensor matching_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  TORCH_CHECK_VALUE(logits.defined() && logits.dim() == 1,
                    "matching_loss: expected logits of shape [B], got ",
                    logits.defined() ? detail::shape_str(logits) : std::string("undefined"));
  TORCH_CHECK_VALUE(labels.defined() && labels.sizes() == logits.sizes(),
                    "matching_loss: expected labels of shape ", detail::shape_str(logits), ", got ",
                    labels.defined() ? detail::shape_str(labels) : std::string("undefined"));
  return F::binary_cross_entropy_with_logits(logits, labels.to(logits.scalar_type()));
}

}  // namespace vlmkit
