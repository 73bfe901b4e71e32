// Activation checkpointing of one block (detail::checkpoint, modules/transformer.h).
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
}  // namespace vlmkit
