#pragma once
/// The training loop as a library: AdamW with parameter groups, freezing,
/// warmup + cosine schedule, gradient clipping and accumulation, a
/// non-finite loss guard, periodic evaluation, a JSONL metrics log, and
/// checkpoints that resume exactly (model, optimizer, RNG and data position).
///
///   auto model = vlmkit::build_model(config);
///   vlmkit::Loader loader(vlmkit::read_jsonl_manifest("tasks.jsonl"), loader_options);
///   vlmkit::Trainer trainer(model, vlmkit::TrainerOptions().steps(600).output_dir("runs/vlm"));
///   trainer.resume();            // no-op without a checkpoint
///   trainer.fit(loader);
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "vlmkit/config.h"
#include "vlmkit/data/batch.h"
#include "vlmkit/detail/autocast.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/optim.h"

namespace vlmkit {

struct TrainerOptions {
  TORCH_ARG(int64_t, steps) = 1000;
  /// Base learning rate; `group_lr` overrides it for parameters whose name
  /// starts with a key ("image_encoder", "projector", "decoder", ...).
  TORCH_ARG(double, lr) = 1e-3;
  using GroupLr = std::map<std::string, double>;
  TORCH_ARG(GroupLr, group_lr) = {};
  /// Parameters whose name starts with one of these are frozen (LLaVA stage
  /// 1: freeze {"image_encoder", "decoder"} and train the projector).
  TORCH_ARG(std::vector<std::string>, freeze) = {};
  /// Decoupled weight decay for matrices; norms, biases and gates get none.
  TORCH_ARG(double, weight_decay) = 0.05;
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.999;
  TORCH_ARG(double, eps) = 1e-8;
  /// Linear warmup, then cosine decay to lr * min_lr_ratio at `steps`.
  TORCH_ARG(int64_t, warmup_steps) = 50;
  TORCH_ARG(double, min_lr_ratio) = 0.0;
  /// The share of `steps`, at the end, that the cosine decay spans; before it
  /// the rate holds at lr after warmup (warmup-stable-decay, "WSD"; 0.2 is the
  /// common choice). 1.0: the cosine spans the whole run.
  TORCH_ARG(double, decay_fraction) = 1.0;
  /// Global gradient-norm clip (0: off).
  TORCH_ARG(double, clip_norm) = 1.0;
  /// Batches per optimizer step.
  TORCH_ARG(int64_t, accumulation) = 1;
  /// Steps whose loss or gradient norm is not finite are skipped (counted);
  /// this many in a row raise FloatingPointError-style ValueError.
  TORCH_ARG(int64_t, max_nonfinite_steps) = 5;
  TORCH_ARG(int64_t, log_every) = 50;
  TORCH_ARG(int64_t, eval_every) = 0;
  /// Checkpoint every N steps (0: only at the end) under output_dir/checkpoints.
  TORCH_ARG(int64_t, checkpoint_every) = 0;
  TORCH_ARG(int64_t, keep_checkpoints) = 2;
  /// Where checkpoints/, metrics.jsonl go ("" : nothing written).
  TORCH_ARG(std::string, output_dir) = "";
  /// "fp32", or "bf16": the forward pass and loss run under bfloat16 autocast
  /// (CPU or CUDA, the model's device); weights, gradients and AdamW state stay
  /// float32. On CPU bf16 GEMMs run on torch's intra-op threads (oneDNN), not
  /// BLAS's: give torch the cores (vlmkit.set_num_threads; `vlmkit train
  /// --precision bf16` does).
  TORCH_ARG(std::string, precision) = "fp32";
  /// Only rank 0 writes files in data-parallel runs.
  TORCH_ARG(int64_t, rank) = 0;
};

/// The options' fields: the one list that the JSON record, the
/// Python binding (keyword arguments) and vlmkit.Trainer's signature read.
template <class V>
void visit_fields(TrainerOptions& o, V& v) {
  v("steps", o.steps());
  v("lr", o.lr());
  v("group_lr", o.group_lr());
  v("freeze", o.freeze());
  v("weight_decay", o.weight_decay());
  v("beta1", o.beta1());
  v("beta2", o.beta2());
  v("eps", o.eps());
  v("warmup_steps", o.warmup_steps());
  v("min_lr_ratio", o.min_lr_ratio());
  v("decay_fraction", o.decay_fraction());
  v("clip_norm", o.clip_norm());
  v("accumulation", o.accumulation());
  v("max_nonfinite_steps", o.max_nonfinite_steps());
  v("log_every", o.log_every());
  v("eval_every", o.eval_every());
  v("checkpoint_every", o.checkpoint_every());
  v("keep_checkpoints", o.keep_checkpoints());
  v("output_dir", o.output_dir());
  v("precision", o.precision());
  v("rank", o.rank());
}

/// A JSON record of the options (written into trainer.json).
inline json trainer_options_to_json(const TrainerOptions& options) { return options_to_json(options); }

struct TrainState {
  int64_t step = 0;
  int64_t epoch = 0;
  int64_t batch_in_epoch = 0;  // batches of `epoch` consumed by completed steps
  int64_t samples = 0;
  int64_t nonfinite_steps = 0;
  double last_loss = 0.0;
};

class Trainer {
 public:
  /// The loss of one batch; the default handles the generative architectures.
  using LossFn = std::function<torch::Tensor(torch::nn::Module&, const Batch&)>;
  /// Called with each log record ({"step", "loss", "lr", "samples_per_second",
  /// "eta_seconds", ...}); the default prints one progress line.
  using LogFn = std::function<void(const json&)>;
  /// Returns metrics (a JSON object) for the model at `step`.
  using EvalFn = std::function<json(int64_t step)>;
  /// Runs after backward, before clipping, on the trainable parameters'
  /// gradients: a data-parallel all-reduce goes here.
  using GradHook = std::function<void(std::vector<torch::Tensor>&)>;
  /// Called once per step; throwing stops training (Python: Ctrl-C).
  using StepHook = std::function<void(int64_t step)>;

  Trainer(std::shared_ptr<torch::nn::Module> model, TrainerOptions options, LossFn loss = nullptr);

  /// Restores model, optimizer, RNG and data position from `path` (a
  /// checkpoint or a run folder) or, when empty, from the latest checkpoint
  /// under output_dir. Returns false when there is none to resume from.
  bool resume(const std::string& path = "");
  /// Trains until options.steps; returns the final record (last loss, rates,
  /// last evaluation).
  json fit(BatchSource& data);
  /// Writes a checkpoint of the current state; returns its path.
  std::string save_checkpoint();

  /// The learning-rate multiplier at `step` (warmup, hold, cosine).
  double schedule(int64_t step) const;
  const TrainState& state() const { return state_; }
  const TrainerOptions& options() const { return options_; }
  torch::optim::AdamW& optimizer() { return *optimizer_; }
  /// Trainable parameters by name (frozen ones excluded).
  const std::vector<std::pair<std::string, torch::Tensor>>& trainable() const { return trainable_; }

  void on_log(LogFn fn) { log_ = std::move(fn); }
  void on_eval(EvalFn fn) { eval_ = std::move(fn); }
  void on_gradients(GradHook fn) { grad_hook_ = std::move(fn); }
  void on_step(StepHook fn) { step_hook_ = std::move(fn); }

 private:
  void log(json record);
  std::string checkpoint_root() const;

  std::shared_ptr<torch::nn::Module> model_;
  TrainerOptions options_;
  LossFn loss_;
  LogFn log_;
  EvalFn eval_;
  GradHook grad_hook_;
  StepHook step_hook_;
  std::vector<std::pair<std::string, torch::Tensor>> trainable_;
  std::vector<double> group_base_lr_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  TrainState state_;
  json last_eval_ = json::object();
  std::vector<std::string> group_names_;
};

/// The default loss: next-token loss of an encoder_decoder model built by
/// vlmkit (build_model or EncoderDecoderImpl<>); other models need a LossFn.
torch::Tensor generative_loss(torch::nn::Module& model, const Batch& batch);

}  // namespace vlmkit
