#pragma once
/// A training batch and the interface of anything that yields them per epoch
/// (the threaded Loader, or a user's own source in C++).
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace vlmkit {

struct Batch {
  torch::Tensor images;        // [I, 3, H, W] float (zero-padded to the batch's largest in "dynamic" mode)
  torch::Tensor image_sizes;   // [I, 2] int64 (height, width) of each image inside `images`
  /// [B] int64: images of each sample, in order (I = the sum; 1 each except
  /// in the loader's "tiles" mode).
  torch::Tensor images_per_sample;
  torch::Tensor input_ids;     // [B, T] int64 (right-padded with <pad>)
  torch::Tensor labels;        // [B, T] int64, kIgnoreIndex outside answers
  torch::Tensor padding_mask;  // [B, T] bool
  /// Packed rows (LoaderOptions::pack_to): [B, T] int64, the example of each
  /// token within its row (0, 1, ...; -1 at padding); undefined otherwise.
  /// images_per_sample then counts the images of each row.
  torch::Tensor segment_ids;
  torch::Tensor indices;       // [N] record indices of the batch's examples, in row order
  /// Other named tensors of a batch from a source of your own (the targets of
  /// a custom loss); moved to the model's device with the fields above.
  std::map<std::string, torch::Tensor> extra;

  /// Examples in the batch: indices, else rows of input_ids, else images.
  int64_t num_examples() const {
    if (indices.defined()) return indices.numel();
    if (input_ids.defined()) return input_ids.size(0);
    return images.defined() && images.dim() > 0 ? images.size(0) : 0;
  }
  /// The model's inputs and targets moved to `device` (those already there
  /// untouched); the bookkeeping (image_sizes, images_per_sample, indices)
  /// stays on the CPU, where the models read it.
  void to(const torch::Device& device) {
    auto move = [&](torch::Tensor& t) {
      if (t.defined() && t.device() != device) t = t.to(device);
    };
    for (auto* t : {&images, &input_ids, &labels, &padding_mask, &segment_ids}) move(*t);
    for (auto& [name, t] : extra) move(t);
  }
};

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  /// Starts epoch `epoch` at its batch `first_batch` (resuming mid-epoch).
  virtual void start_epoch(int64_t epoch, int64_t first_batch = 0) = 0;
  /// The next batch of the epoch; nullopt once the epoch is done.
  virtual std::optional<Batch> next() = 0;
  virtual int64_t num_batches() const = 0;
};

}  // namespace vlmkit
