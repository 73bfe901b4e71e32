// The scoped autocast state (detail/autocast.h).
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
}  // namespace vlmkit
