#pragma once
/// AdamW with the update of each parameter in one fused pass.
#include <torch/optim/adamw.h>

namespace vlmkit {

/// torch::optim::AdamW (Loshchilov & Hutter 2019) whose step updates each
/// float32 CPU parameter, its two moments and its decay in a single pass over
/// memory instead of eight ATen ops per tensor; the updates of every
/// parameter run as one pass over 16K-element chunks on run_parallel (all
/// cores under either thread policy). On the 2-core reference machine: 2.9 ms
/// per step for the small VLM's 1.87 M parameters, against 6.2 ms with one
/// pass per parameter and 5.7-8.1 ms for torch.optim.AdamW (docs/benchmarks.md,
/// "FusedAdamW on both cores"). The state (AdamWParamState, the same keys)
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
