#pragma once
/// AdamW with the update of each parameter in one fused pass.
#include <torch/optim/adamw.h>

namespace vlmkit {

/// torch::optim::AdamW (Loshchilov & Hutter 2019) whose step updates each
/// float32 CPU parameter, its two moments and its decay in a single pass over
/// memory (at::parallel_for over torch's intra-op threads) instead of eight
/// ATen ops per tensor. On the 2-core reference machine it runs at torch's
/// speed (the update is memory-bound there; docs/benchmarks.md). The state (AdamWParamState, the same keys)
/// and so checkpoints are torch::optim::AdamW's; other dtypes and devices (CUDA)
/// take AdamW's sequence over all of them at once, through torch's multi-tensor
/// (foreach) kernels, as torch.optim.AdamW does by default on CUDA. The results equal AdamW's up to float rounding (tests:
/// 1e-6 relative after several steps). amsgrad is refused.
class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

}  // namespace vlmkit
