#pragma once
/// The Linear layer every vlmkit block uses: torch::nn::Linear (same "weight"
/// and "bias" names and layout, so checkpoints are unchanged) that can carry a
/// LoRA adapter (Hu et al. 2021):
///
///   y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A [r, in], B [out, r]
///
/// A starts Kaiming-uniform and B at zero, so attaching an adapter leaves the
/// output unchanged. The adapter's tensors are the children `lora_A` and
/// `lora_B` (state names `<path>.lora_A.weight`, `<path>.lora_B.weight`, as
/// PEFT's). `merge` folds the adapter into W (inference, export) and `unmerge`
/// takes it out again. Attach adapters to a whole model with
/// vlmkit::apply_lora (train/lora.h).
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

namespace vlmkit {

class LinearImpl : public torch::nn::LinearImpl {
 public:
  using torch::nn::LinearImpl::LinearImpl;

  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;
  /// A deep copy, adapter and merge state included.
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<torch::Device>& device = c10::nullopt) const override;

  /// Attaches a rank-`rank` adapter (alpha / rank scales it; dropout on its
  /// input while training). Throws if one is attached already.
  void add_lora(int64_t rank, double alpha, double dropout = 0.0);
  bool has_lora() const { return !lora_A.is_empty(); }
  int64_t lora_rank() const { return has_lora() ? lora_A->options.out_features() : 0; }
  double lora_alpha() const { return alpha_; }
  double lora_dropout() const { return dropout_; }
  double lora_scaling() const { return has_lora() ? alpha_ / double(lora_rank()) : 0.0; }
  /// W += scaling * B A (the adapter then stops contributing on its own).
  void merge();
  /// W -= scaling * B A.
  void unmerge();
  bool merged() const { return merged_; }
  /// Detaches the adapter (unmerged: its contribution is dropped; merged: it
  /// stays folded into W).
  void remove_lora();

  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};

 private:
  double alpha_ = 0.0;
  double dropout_ = 0.0;
  bool merged_ = false;
};
TORCH_MODULE(Linear);

}  // namespace vlmkit
