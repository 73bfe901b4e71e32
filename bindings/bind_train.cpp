// Checkpoints, safetensors and the C++ Trainer, bound for vlmkit.checkpoint
// and vlmkit.Trainer.
#include <Python.h>

#include "common.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/lora.h"
#include "vlmkit/train/trainer.h"

namespace vlmkit::bindings {
namespace {

TensorMap to_tensor_map(const py::dict& d) {
  TensorMap out;
  for (const auto& item : d) out[item.first.cast<std::string>()] = item.second.cast<torch::Tensor>();
  return out;
}

py::dict from_tensor_map(const TensorMap& m) {
  py::dict d;
  for (const auto& [k, v] : m) d[py::str(k)] = v;
  return d;
}

/// Wraps a Python callable so C++ may call it from a GIL-free section.
template <class R, class... Args, class F>
std::function<R(Args...)> with_gil(py::object fn, F convert) {
  if (fn.is_none()) return nullptr;
  auto holder = std::make_shared<py::object>(std::move(fn));
  return [holder, convert](Args... args) -> R {
    py::gil_scoped_acquire gil;
    return convert(*holder, args...);
  };
}

/// Batches from Python: `epochs(epoch)` returns an iterable of dicts of tensors
/// for that epoch (dict_to_batch). Resuming mid-epoch skips the batches of the
/// epoch that completed steps consumed, so an exact resume needs an epoch whose
/// order depends on the epoch number alone.
class IterableBatchSource : public BatchSource {
 public:
  IterableBatchSource(py::object epochs, int64_t num_batches)
      : epochs_(std::move(epochs)), num_batches_(num_batches) {
    TORCH_CHECK_TYPE(PyCallable_Check(epochs_.ptr()), "IterableBatchSource: expected a callable epoch -> iterable");
  }
  ~IterableBatchSource() override {
    py::gil_scoped_acquire gil;
    iterator_ = py::object();
    epochs_ = py::object();
  }
  void start_epoch(int64_t epoch, int64_t first_batch) override {
    py::gil_scoped_acquire gil;
    iterator_ = py::iter(epochs_(epoch));
    for (int64_t i = 0; i < first_batch; ++i) {
      if (!next_item()) break;
    }
  }
  std::optional<Batch> next() override {
    py::gil_scoped_acquire gil;
    auto item = next_item();
    if (!item) return std::nullopt;
    return dict_to_batch(*item);
  }
  int64_t num_batches() const override { return num_batches_; }

 private:
  std::optional<py::object> next_item() {
    TORCH_CHECK_VALUE(iterator_, "IterableBatchSource: next() before start_epoch()");
    PyObject* item = PyIter_Next(iterator_.ptr());
    if (item == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return std::nullopt;
    }
    return py::reinterpret_steal<py::object>(item);
  }
  py::object epochs_, iterator_;
  int64_t num_batches_;
};

/// A torch::nn::Module holding the given tensors under their dotted names
/// (child modules for the dots), sharing their storage: the Trainer's view of
/// a Python nn.Module's parameters and buffers.
std::shared_ptr<torch::nn::Module> tensor_module(const std::vector<std::pair<std::string, torch::Tensor>>& parameters,
                                                 const std::vector<std::pair<std::string, torch::Tensor>>& buffers) {
  auto root = std::make_shared<torch::nn::Module>("PythonModule");
  auto place = [&](const std::string& dotted, const torch::Tensor& t, bool parameter) {
    TORCH_CHECK_VALUE(!dotted.empty() && dotted.front() != '.' && dotted.back() != '.' &&
                          dotted.find("..") == std::string::npos,
                      "Trainer: bad tensor name '", dotted, "'");
    torch::nn::Module* at = root.get();
    size_t start = 0;
    for (size_t dot = dotted.find('.'); dot != std::string::npos; dot = dotted.find('.', start)) {
      const auto part = dotted.substr(start, dot - start);
      const auto* child = at->named_children().find(part);
      at = child ? child->get() : at->register_module(part, std::make_shared<torch::nn::Module>(part)).get();
      start = dot + 1;
    }
    const auto leaf = dotted.substr(start);
    if (parameter) at->register_parameter(leaf, t, t.requires_grad());
    else at->register_buffer(leaf, t);
  };
  for (const auto& [name, t] : parameters) place(name, t, true);
  for (const auto& [name, t] : buffers) place(name, t, false);
  return root;
}

}  // namespace

void bind_train(py::module_& m) {
  static py::exception<NotFound> not_found(m, "CheckpointNotFound", PyExc_FileNotFoundError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const NotFound& e) {
      PyErr_SetString(not_found.ptr(), e.what_without_backtrace());
    }
  });

  py::class_<BatchSource>(m, "BatchSource", "Anything the Trainer can draw batches from (vlmkit.data.Loader).");
  py::class_<IterableBatchSource, BatchSource>(
      m, "IterableBatchSource", "Batches from Python: epochs(epoch) -> an iterable of dicts of tensors.")
      .def(py::init<py::object, int64_t>(), py::arg("epochs"), py::arg("num_batches") = -1);
  m.def("tensor_module", &tensor_module, py::arg("parameters"), py::arg("buffers"),
        "A torch::nn::Module sharing the given named tensors (the Trainer's view of a Python module).");

  py::class_<FusedAdamW>(m, "FusedAdamW", "torch::optim::AdamW with one fused pass per parameter (vlmkit.FusedAdamW).")
      .def(py::init([](const std::vector<torch::Tensor>& params, double lr, double beta1, double beta2, double eps,
                       double weight_decay) {
             TORCH_CHECK_VALUE(!params.empty(), "FusedAdamW: expected at least one parameter that requires grad");
             TORCH_CHECK_VALUE(lr >= 0 && eps >= 0 && weight_decay >= 0 && beta1 >= 0 && beta1 < 1 && beta2 >= 0 &&
                                   beta2 < 1,
                               "FusedAdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr=", lr,
                               ", betas=(", beta1, ", ", beta2, "), eps=", eps, ", weight_decay=", weight_decay);
             for (const auto& p : params)
               TORCH_CHECK_VALUE(p.is_leaf() && p.requires_grad(),
                                 "FusedAdamW: expected leaf tensors that require grad (parameters)");
             return std::make_unique<FusedAdamW>(
                 params, torch::optim::AdamWOptions(lr).betas({beta1, beta2}).eps(eps).weight_decay(weight_decay));
           }),
           py::arg("params"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("weight_decay"))
      .def("step", [](FusedAdamW& self) { self.step(); }, py::call_guard<py::gil_scoped_release>())
      .def_property(
          "lr", [](FusedAdamW& self) { return static_cast<torch::optim::AdamWOptions&>(self.param_groups()[0].options()).lr(); },
          [](FusedAdamW& self, double lr) {
            TORCH_CHECK_VALUE(lr >= 0, "FusedAdamW: lr must be >= 0, got ", lr);
            static_cast<torch::optim::AdamWOptions&>(self.param_groups()[0].options()).lr(lr);
          });

  m.def("save_safetensors",
        [](const std::string& path, const py::dict& tensors, const StringMap& metadata) {
          auto t = to_tensor_map(tensors);
          py::gil_scoped_release release;
          save_safetensors(path, t, metadata);
        },
        py::arg("path"), py::arg("tensors"), py::arg("metadata") = StringMap{});
  m.def("load_safetensors",
        [](const std::string& path) {
          std::pair<TensorMap, StringMap> out;
          {
            py::gil_scoped_release release;
            out = load_safetensors(path);
          }
          return py::make_tuple(from_tensor_map(out.first), out.second);
        },
        py::arg("path"));
  m.def("parse_safetensors",
        [](const py::bytes& data, const std::string& what) {
          auto out = parse_safetensors(std::string(data), what);
          return py::make_tuple(from_tensor_map(out.first), out.second);
        },
        py::arg("data"), py::arg("what") = "bytes");
  m.def("sha256_hex", [](const py::bytes& data) { return sha256_hex(std::string(data)); }, py::arg("data"));
  m.def("latest_checkpoint", &latest_checkpoint, py::arg("root"));
  m.def("prune_checkpoints", &prune_checkpoints, py::arg("root"), py::arg("keep"));
  m.def("load_module_state",
        [](torch::nn::Module& module, const py::dict& state, const std::string& what) {
          load_module_state(module, to_tensor_map(state), what);
        },
        py::arg("module"), py::arg("state"), py::arg("what") = "state");
  m.def("save_model", &save_model, py::arg("root"), py::arg("model"), py::arg("name") = "model",
        py::call_guard<py::gil_scoped_release>());

  // LoRA (vlmkit.lora wraps these with Python signatures and docs).
  m.def("lora_apply",
        [](torch::nn::Module& model, int64_t rank, double alpha, double dropout,
           const std::vector<std::string>& target_modules, bool freeze_base) {
          return apply_lora(model, LoraOptions()
                                       .rank(rank)
                                       .alpha(alpha)
                                       .dropout(dropout)
                                       .target_modules(target_modules)
                                       .freeze_base(freeze_base));
        },
        py::arg("model"), py::arg("rank"), py::arg("alpha"), py::arg("dropout"), py::arg("target_modules"),
        py::arg("freeze_base"));
  m.def("lora_apply_config",
        [](torch::nn::Module& model, const py::object& config) {
          return apply_lora(model, lora_options_from_json(to_json(config)));
        },
        py::arg("model"), py::arg("config"));
  m.def("lora_layers", &lora_layers, py::arg("model"));
  m.def("lora_merged", &lora_merged, py::arg("model"));
  m.def("lora_config", [](const torch::nn::Module& model) { return to_python(lora_config_json(model)); },
        py::arg("model"));
  m.def("lora_merge", &merge_lora, py::arg("model"));
  m.def("lora_unmerge", &unmerge_lora, py::arg("model"));
  m.def("lora_remove", &remove_lora, py::arg("model"), py::arg("merge"));
  m.def("lora_state", [](const torch::nn::Module& model) { return from_tensor_map(adapter_state(model)); },
        py::arg("model"));
  m.def("lora_save", &save_adapter, py::arg("dir"), py::arg("model"), py::call_guard<py::gil_scoped_release>());
  m.def("lora_load", &load_adapter, py::arg("model"), py::arg("dir"), py::call_guard<py::gil_scoped_release>());
  m.def("lora_target_matches", &lora_target_matches, py::arg("pattern"), py::arg("path"));

  py::class_<CheckpointWriter>(m, "CheckpointWriter")
      .def(py::init<std::string, std::string>(), py::arg("root"), py::arg("name"))
      .def("add_json", [](CheckpointWriter& w, const std::string& file, const py::object& value) {
        w.add_json(file, to_json(value));
      }, py::arg("file"), py::arg("value"))
      .def("add_tensors", [](CheckpointWriter& w, const std::string& file, const py::dict& tensors,
                             const StringMap& metadata) { w.add_tensors(file, to_tensor_map(tensors), metadata); },
           py::arg("file"), py::arg("tensors"), py::arg("metadata") = StringMap{})
      .def("commit", &CheckpointWriter::commit, py::arg("update_latest") = true,
           py::call_guard<py::gil_scoped_release>());

  py::class_<Checkpoint>(m, "Checkpoint")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("path", &Checkpoint::path)
      .def("has", &Checkpoint::has, py::arg("file"))
      .def("verify", &Checkpoint::verify, py::call_guard<py::gil_scoped_release>())
      .def("read_json", [](const Checkpoint& c, const std::string& file) { return to_python(c.read_json(file)); },
           py::arg("file"))
      .def("read_tensors", [](const Checkpoint& c, const std::string& file) {
        StringMap meta;
        TensorMap t;
        {
          py::gil_scoped_release release;
          t = c.read_tensors(file, &meta);
        }
        return py::make_tuple(from_tensor_map(t), meta);
      }, py::arg("file"));

  py::class_<Trainer>(m, "Trainer", "The C++ training loop (see vlmkit.Trainer).")
      .def(py::init([](std::shared_ptr<torch::nn::Module> model, const py::dict& options, py::object loss) {
             const auto j = to_json(options);
             TrainerOptions o;
             read_options(j, "Trainer", o, {});
             auto fn = with_gil<torch::Tensor, torch::nn::Module&, const Batch&>(
                 loss, [](py::object& f, torch::nn::Module&, const Batch& b) {
                   return f(batch_to_dict(b)).cast<torch::Tensor>();
                 });
             return std::make_unique<Trainer>(std::move(model), o, fn);
           }),
           py::arg("model"), py::arg("options"), py::arg("loss") = py::none())
      .def("resume", &Trainer::resume, py::arg("path") = "", py::call_guard<py::gil_scoped_release>())
      .def("save_checkpoint", &Trainer::save_checkpoint, py::call_guard<py::gil_scoped_release>())
      .def("schedule", &Trainer::schedule, py::arg("step"))
      .def_property_readonly("options", [](const Trainer& t) { return to_python(trainer_options_to_json(t.options())); })
      .def_property_readonly_static("defaults", [](py::object) { return to_python(trainer_options_to_json({})); },
                                    "Every option with its default, by name (vlmkit.Trainer's keywords).")
      .def_property_readonly("state", [](const Trainer& t) {
        const auto& s = t.state();
        py::dict d;
        d["step"] = s.step;
        d["epoch"] = s.epoch;
        d["batch_in_epoch"] = s.batch_in_epoch;
        d["samples"] = s.samples;
        d["nonfinite_steps"] = s.nonfinite_steps;
        d["last_loss"] = s.last_loss;
        return d;
      })
      .def_property_readonly("trainable", [](const Trainer& t) {
        std::vector<std::string> names;
        for (const auto& p : t.trainable()) names.push_back(p.first);
        return names;
      })
      .def("fit",
           [](Trainer& self, BatchSource& data, py::object on_log, py::object evaluate, py::object gradients) {
             if (!on_log.is_none())
               self.on_log(with_gil<void, const json&>(on_log, [](py::object& f, const json& r) { f(to_python(r)); }));
             self.on_eval(with_gil<json, int64_t>(evaluate, [](py::object& f, int64_t step) {
               auto out = f(step);
               return out.is_none() ? json::object() : to_json(out);
             }));
             self.on_gradients(with_gil<void, std::vector<torch::Tensor>&>(
                 gradients, [](py::object& f, std::vector<torch::Tensor>& g) { f(py::cast(g)); }));
             // Ctrl-C (and other pending signals) stop training between steps.
             self.on_step([](int64_t) {
               py::gil_scoped_acquire gil;
               if (PyErr_CheckSignals() != 0) throw py::error_already_set();
             });
             json out;
             {
               py::gil_scoped_release release;
               out = self.fit(data);
             }
             return to_python(out);
           },
           py::arg("data"), py::arg("on_log") = py::none(), py::arg("evaluate") = py::none(),
           py::arg("gradients") = py::none());
}

}  // namespace vlmkit::bindings
