// The Trainer: steps, schedules, checkpoints, exact resume, logs (train/trainer.h).
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include "../internal.h"
#include "files.h"
#include "vlmkit/models/build.h"
#include "vlmkit/runtime.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/lora.h"
#include "vlmkit/train/trainer.h"

namespace fs = std::filesystem;

namespace vlmkit {
using detail::join_list;
using detail::optimizer_key;
using detail::write_synced;

// ------------------------------------------------------------------ trainer


torch::Tensor generative_loss(torch::nn::Module& model, const Batch& batch) {
  if (auto* m = dynamic_cast<EncoderDecoderImpl<>*>(&model))
    return m->forward(batch.images, batch.input_ids, batch.padding_mask, batch.labels, batch.image_sizes,
                      batch.segment_ids)
        .loss;
  TORCH_CHECK_VALUE(false, "Trainer: no built-in loss for ", model.name(),
                    " (it handles encoder_decoder models); pass a loss function");
}

namespace {
bool has_prefix(const std::string& name, const std::string& prefix) {
  return name == prefix || (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
                            name[prefix.size()] == '.');
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = int64_t(seconds + 0.5);
  std::ostringstream out;
  if (s >= 3600) out << s / 3600 << "h" << std::setw(2) << std::setfill('0') << (s % 3600) / 60 << "m";
  else if (s >= 60) out << s / 60 << "m" << std::setw(2) << std::setfill('0') << s % 60 << "s";
  else out << s << "s";
  return out.str();
}
}  // namespace

Trainer::Trainer(std::shared_ptr<torch::nn::Module> model, TrainerOptions options, LossFn loss)
    : model_(std::move(model)), options_(std::move(options)), loss_(loss ? std::move(loss) : generative_loss) {
  TORCH_CHECK_VALUE(model_, "Trainer: model is null");
  const auto& o = options_;
  TORCH_CHECK_VALUE(o.steps() >= 1, "Trainer: steps must be >= 1, got ", o.steps());
  TORCH_CHECK_VALUE(o.lr() > 0 && std::isfinite(o.lr()), "Trainer: lr must be a positive number, got ", o.lr());
  TORCH_CHECK_VALUE(o.accumulation() >= 1, "Trainer: accumulation must be >= 1, got ", o.accumulation());
  TORCH_CHECK_VALUE(o.precision() == "fp32" || o.precision() == "bf16", "Trainer: precision must be 'fp32' or 'bf16', got '",
                    o.precision(), "'");
  TORCH_CHECK_VALUE(o.decay_fraction() > 0 && o.decay_fraction() <= 1,
                    "Trainer: decay_fraction must be in (0, 1] (the share of steps the cosine decay spans), got ",
                    o.decay_fraction());
  TORCH_CHECK_VALUE(o.warmup_steps() >= 0 && o.min_lr_ratio() >= 0 && o.min_lr_ratio() <= 1 && o.clip_norm() >= 0 &&
                        o.weight_decay() >= 0 && o.max_nonfinite_steps() >= 1 && o.log_every() >= 0 &&
                        o.eval_every() >= 0 && o.checkpoint_every() >= 0 && o.keep_checkpoints() >= 1,
                    "Trainer: need warmup_steps >= 0, min_lr_ratio in [0, 1], clip_norm >= 0, weight_decay >= 0, "
                    "max_nonfinite_steps >= 1, log/eval/checkpoint intervals >= 0 and keep_checkpoints >= 1");
  std::vector<std::string> top;
  for (const auto& c : model_->named_children()) top.push_back(c.key());
  auto params = model_->named_parameters(true);
  auto check_prefix = [&](const std::string& prefix, const char* option) {
    bool any = false;
    for (const auto& p : params) any |= has_prefix(p.key(), prefix);
    TORCH_CHECK_VALUE(any, "Trainer: ", option, " names '", prefix, "', which matches no parameter; components are ",
                      join_list(top, 32));
  };
  for (const auto& f : o.freeze()) check_prefix(f, "freeze");
  for (const auto& g : o.group_lr()) {
    check_prefix(g.first, "group_lr");
    TORCH_CHECK_VALUE(g.second > 0, "Trainer: group_lr['", g.first, "'] must be positive, got ", g.second);
  }
  // One optimizer group per (learning-rate group, decay or not).
  std::map<std::pair<std::string, bool>, std::vector<torch::Tensor>> groups;
  for (const auto& p : params) {
    auto t = p.value();
    bool frozen = false;
    for (const auto& f : o.freeze()) frozen |= has_prefix(p.key(), f);
    if (frozen) {
      t.set_requires_grad(false);
      continue;
    }
    if (!t.requires_grad()) continue;
    std::string group;
    for (const auto& g : o.group_lr())
      if (has_prefix(p.key(), g.first) && g.first.size() > group.size()) group = g.first;
    groups[{group, t.dim() >= 2}].push_back(t);
    trainable_.emplace_back(p.key(), t);
  }
  TORCH_CHECK_VALUE(!trainable_.empty(), "Trainer: every parameter is frozen; nothing to train");
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  for (auto& [key, tensors] : groups) {
    const double lr = key.first.empty() ? o.lr() : o.group_lr().at(key.first);
    auto opts = std::make_unique<torch::optim::AdamWOptions>(lr);
    opts->betas({o.beta1(), o.beta2()}).eps(o.eps()).weight_decay(key.second ? o.weight_decay() : 0.0);
    param_groups.emplace_back(tensors, std::move(opts));
    group_base_lr_.push_back(lr);
    group_names_.push_back((key.first.empty() ? "default" : key.first) + (key.second ? "" : "/no_decay"));
  }
  optimizer_ = std::make_unique<FusedAdamW>(param_groups, torch::optim::AdamWOptions(o.lr()));
  log_ = [](const json& r) {
    if (r.contains("eval")) {
      std::cout << "eval at step " << r["step"].get<int64_t>() << ": " << r["eval"].dump() << std::endl;
      return;
    }
    std::ostringstream line;
    line << "step " << std::setw(6) << r["step"].get<int64_t>() << "/" << r["steps"].get<int64_t>() << "  loss "
         << std::fixed << std::setprecision(4) << r["loss"].get<double>() << "  lr " << std::scientific
         << std::setprecision(2) << r["lr"].get<double>() << "  " << std::fixed << std::setprecision(1)
         << r["samples_per_second"].get<double>() << " samples/s  eta "
         << format_duration(r["eta_seconds"].get<double>());
    std::cout << line.str() << std::endl;
  };
}

double Trainer::schedule(int64_t step) const {
  const auto& o = options_;
  const double warm = o.warmup_steps() > 0 ? std::min(1.0, double(step + 1) / double(o.warmup_steps())) : 1.0;
  // The decay spans the last decay_fraction of the steps; before it, progress 0.
  const double span = o.decay_fraction() * double(o.steps());
  const double start = double(o.steps()) - span;
  const double progress = std::clamp((double(std::min(step, o.steps())) - start) / span, 0.0, 1.0);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return warm * (o.min_lr_ratio() + (1.0 - o.min_lr_ratio()) * cosine);
}

std::string Trainer::checkpoint_root() const {
  return options_.output_dir().empty() ? "" : (fs::path(options_.output_dir()) / "checkpoints").string();
}

void Trainer::log(json record) {
  if (options_.rank() == 0 && !options_.output_dir().empty()) {
    fs::create_directories(options_.output_dir());
    std::ofstream out(fs::path(options_.output_dir()) / "metrics.jsonl", std::ios::app);
    out << record.dump() << "\n";
  }
  if (log_ && options_.rank() == 0) log_(record);
}

std::string Trainer::save_checkpoint() {
  const auto root = checkpoint_root();
  TORCH_CHECK_VALUE(!root.empty(), "Trainer.save_checkpoint: options.output_dir is empty");
  if (options_.rank() != 0) return "";
  std::ostringstream name;
  name << "step-" << std::setw(8) << std::setfill('0') << state_.step;
  CheckpointWriter writer(root, name.str());
  json config;
  try {
    config = model_config(*model_);
  } catch (const c10::Error&) {
    config = nullptr;  // a template model with custom slots: weights only
  }
  writer.add_json("config.json", config);
  detail::add_model_state(writer, *model_);
  TensorMap opt;
  auto& states = optimizer_->state();
  for (const auto& [n, p] : trainable_) {
    auto it = states.find(optimizer_key<decltype(states)>(p));
    if (it == states.end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    opt[n + ".exp_avg"] = s.exp_avg();
    opt[n + ".exp_avg_sq"] = s.exp_avg_sq();
    opt[n + ".step"] = torch::tensor(s.step(), torch::kLong);
  }
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    opt["rng.torch_cpu"] = gen.get_state();
  }
  writer.add_tensors("optimizer.safetensors", opt, {{"format", "vlmkit-adamw"}});
  writer.add_json("trainer.json", {{"format", "vlmkit-checkpoint"},
                                   {"version", 1},
                                   {"step", state_.step},
                                   {"epoch", state_.epoch},
                                   {"batch_in_epoch", state_.batch_in_epoch},
                                   {"samples", state_.samples},
                                   {"nonfinite_steps", state_.nonfinite_steps},
                                   {"last_loss", state_.last_loss},
                                   {"options", trainer_options_to_json(options_)},
                                   {"groups", group_names_},
                                   {"last_eval", last_eval_},
                                   {"writer", std::string("vlmkit ") + version() + " (C++ Trainer)"},
                                   {"torch_version", torch_version()}});
  auto path = writer.commit();
  prune_checkpoints(root, options_.keep_checkpoints());
  return path;
}

bool Trainer::resume(const std::string& path) {
  std::string where = path;
  if (where.empty()) {
    if (checkpoint_root().empty()) return false;
    where = latest_checkpoint(checkpoint_root());
    if (where.empty()) return false;
  }
  Checkpoint checkpoint(where);
  load_module_state(*model_, checkpoint.read_tensors("model.safetensors"), checkpoint.path());
  if (checkpoint.has("optimizer.safetensors")) {
    auto opt = checkpoint.read_tensors("optimizer.safetensors");
    auto& states = optimizer_->state();
    for (const auto& [n, p] : trainable_) {
      auto m = opt.find(n + ".exp_avg"), v = opt.find(n + ".exp_avg_sq"), s = opt.find(n + ".step");
      if (m == opt.end() || v == opt.end() || s == opt.end()) continue;  // new to training: fresh moments
      TORCH_CHECK_VALUE(m->second.sizes() == p.sizes() && v->second.sizes() == p.sizes(), "checkpoint '",
                        checkpoint.path(), "': optimizer state of ", n, " has shape ", detail::shape_str(m->second),
                        ", the parameter ", detail::shape_str(p));
      auto state = std::make_unique<torch::optim::AdamWParamState>();
      state->step(s->second.item<int64_t>());
      state->exp_avg(m->second.to(p.options()));
      state->exp_avg_sq(v->second.to(p.options()));
      states[optimizer_key<decltype(states)>(p)] = std::move(state);
    }
    auto rng = opt.find("rng.torch_cpu");
    if (rng != opt.end()) {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng->second);
    }
  }
  json t = checkpoint.has("trainer.json") ? checkpoint.read_json("trainer.json") : json::object();
  TORCH_CHECK_VALUE(t.is_object(), "checkpoint '", checkpoint.path(), "': trainer.json must be an object");
  state_ = TrainState{};
  state_.step = t.value("step", int64_t(0));
  state_.epoch = t.value("epoch", int64_t(0));
  state_.batch_in_epoch = t.value("batch_in_epoch", int64_t(0));
  state_.samples = t.value("samples", int64_t(0));
  state_.nonfinite_steps = t.value("nonfinite_steps", int64_t(0));
  state_.last_loss = t.value("last_loss", 0.0);
  // The log keeps what happened up to the checkpoint (a killed run may have
  // logged later steps that are about to be redone).
  if (options_.rank() == 0 && !options_.output_dir().empty()) {
    const auto log_path = fs::path(options_.output_dir()) / "metrics.jsonl";
    std::ifstream in(log_path);
    std::string line, kept;
    while (std::getline(in, line)) {
      try {
        auto record = json::parse(line);
        if (record.value("step", int64_t(0)) <= state_.step) kept += line + "\n";
      } catch (const json::exception&) {
        // a torn last line of a killed run
      }
    }
    if (in.is_open()) {
      in.close();
      write_synced(log_path.string(), kept);
    }
  }
  return true;
}

json Trainer::fit(BatchSource& data) {
  const auto& o = options_;
  const auto device = trainable_.front().second.device();
  std::vector<torch::Tensor> params;
  for (const auto& [n, p] : trainable_) params.push_back(p);
  model_->train();
  data.start_epoch(state_.epoch, state_.batch_in_epoch);
  const auto start = std::chrono::steady_clock::now();
  const int64_t first_step = state_.step, first_samples = state_.samples;
  int64_t consecutive_bad = 0;
  double grad_norm = 0.0;
  bool evaluated_last = false;
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  while (state_.step < o.steps()) {
    if (step_hook_) step_hook_(state_.step);
    optimizer_->zero_grad();
    int64_t epoch = state_.epoch, position = state_.batch_in_epoch, samples = 0;
    double loss_sum = 0.0;
    for (int64_t a = 0; a < o.accumulation(); ++a) {
      auto batch = data.next();
      if (!batch) {
        data.start_epoch(++epoch, 0);
        position = 0;
        batch = data.next();
        TORCH_CHECK_VALUE(batch, "Trainer: the data yielded no batch for a whole epoch (empty dataset, or fewer "
                                 "records than one batch with drop_last)");
      }
      ++position;
      batch->to(device);
      torch::Tensor loss;
      {
        std::optional<detail::Autocast> autocast;
        if (o.precision() == "bf16") autocast.emplace(device, torch::kBFloat16);
        loss = loss_(*model_, *batch);
      }
      if (loss.defined() && loss.scalar_type() != torch::kFloat && loss.is_floating_point())
        loss = loss.to(torch::kFloat);
      TORCH_CHECK_VALUE(loss.defined() && loss.numel() == 1, "Trainer: the loss function must return a scalar");
      (o.accumulation() > 1 ? loss / double(o.accumulation()) : loss).backward();
      loss_sum += loss.item<double>();
      samples += batch->num_examples();  // examples, not rows: a packed row holds several
    }
    const double loss_value = loss_sum / double(o.accumulation());
    if (grad_hook_) {
      std::vector<torch::Tensor> grads;
      for (auto& p : params) {
        if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
        grads.push_back(p.grad());
      }
      grad_hook_(grads);
    }
    grad_norm = torch::nn::utils::clip_grad_norm_(params, o.clip_norm() > 0 ? o.clip_norm() : INFINITY);
    if (std::isfinite(loss_value) && std::isfinite(grad_norm)) {
      const double factor = schedule(state_.step);
      auto& groups = optimizer_->param_groups();
      for (size_t g = 0; g < groups.size(); ++g)
        static_cast<torch::optim::AdamWOptions&>(groups[g].options()).lr(group_base_lr_[g] * factor);
      optimizer_->step();
      consecutive_bad = 0;
    } else {
      ++state_.nonfinite_steps;
      TORCH_CHECK_VALUE(++consecutive_bad < o.max_nonfinite_steps(), "Trainer: loss or gradient not finite for ",
                        consecutive_bad, " steps in a row (at step ", state_.step, ", loss ", loss_value,
                        ", gradient norm ", grad_norm, "); lower the learning rate or check the data");
    }
    ++state_.step;
    state_.epoch = epoch;
    state_.batch_in_epoch = position;
    state_.samples += samples;
    state_.last_loss = loss_value;
    evaluated_last = false;
    if (o.log_every() > 0 && (state_.step % o.log_every() == 0 || state_.step == first_step + 1 ||
                              state_.step == o.steps())) {
      const double seconds = elapsed(), rate = double(state_.samples - first_samples) / std::max(seconds, 1e-9);
      const double per_step = seconds / double(state_.step - first_step);
      log({{"step", state_.step},
           {"steps", o.steps()},
           {"epoch", state_.epoch},
           {"loss", loss_value},
           {"lr", o.lr() * schedule(state_.step - 1)},
           {"grad_norm", grad_norm},
           {"samples_per_second", rate},
           {"elapsed_seconds", seconds},
           {"eta_seconds", per_step * double(o.steps() - state_.step)},
           {"nonfinite_steps", state_.nonfinite_steps}});
    }
    if (eval_ && o.eval_every() > 0 && state_.step % o.eval_every() == 0) {
      last_eval_ = eval_(state_.step);
      model_->train();
      log({{"step", state_.step}, {"eval", last_eval_}});
      evaluated_last = true;
    }
    if (!checkpoint_root().empty() && o.checkpoint_every() > 0 && state_.step % o.checkpoint_every() == 0 &&
        state_.step < o.steps())
      save_checkpoint();
  }
  if (eval_ && !evaluated_last) {
    last_eval_ = eval_(state_.step);
    model_->train();
    log({{"step", state_.step}, {"eval", last_eval_}});
  }
  json summary = {{"step", state_.step},
                  {"loss", state_.last_loss},
                  {"grad_norm", grad_norm},
                  {"train_seconds", elapsed()},
                  {"samples", state_.samples},
                  {"samples_per_second", double(state_.samples - first_samples) / std::max(elapsed(), 1e-9)},
                  {"nonfinite_steps", state_.nonfinite_steps},
                  {"eval", last_eval_}};
  if (!checkpoint_root().empty()) summary["checkpoint"] = save_checkpoint();
  return summary;
}

}  // namespace vlmkit
