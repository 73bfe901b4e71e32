#pragma once
// Shared helpers for the bindings: kwargs <-> JSON, optional tensors, and the
// binding of a module with its Python-visible options and repr.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <functional>
#include <optional>
#include <sstream>

#include "vlmkit/config.h"
#include "vlmkit/data/batch.h"
#include "vlmkit/modules/encoder.h"

namespace vlmkit::bindings {

namespace py = pybind11;
using OptTensor = std::optional<torch::Tensor>;

inline torch::Tensor value_or_undefined(const OptTensor& t) { return t ? *t : torch::Tensor(); }

inline OptTensor defined_or_none(const torch::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

/// Python object (dict, kwargs) -> JSON via the json module, so every Python
/// number, bool and nested container maps exactly as json.dumps maps it.
inline json to_json(const py::handle& object) {
  auto text = py::module_::import("json").attr("dumps")(object).cast<std::string>();
  return parse_json(text, "arguments");
}

inline py::object to_python(const json& value) {
  return py::module_::import("json").attr("loads")(value.dump());
}

/// The Batch fields by their Python names (the Loader's dict keys).
inline const std::array<std::pair<const char*, torch::Tensor Batch::*>, 8>& batch_fields() {
  static const std::array<std::pair<const char*, torch::Tensor Batch::*>, 8> fields{{
      {"images", &Batch::images},
      {"image_sizes", &Batch::image_sizes},
      {"images_per_sample", &Batch::images_per_sample},
      {"input_ids", &Batch::input_ids},
      {"labels", &Batch::labels},
      {"padding_mask", &Batch::padding_mask},
      {"segment_ids", &Batch::segment_ids},
      {"indices", &Batch::indices},
  }};
  return fields;
}

/// A training batch as the dict the Python Loader yields.
inline py::dict batch_to_dict(const Batch& b) {
  py::dict d;  // the defined fields (a Loader's batch defines all but the optional ones)
  for (const auto& [key, field] : batch_fields())
    if ((b.*field).defined()) d[key] = b.*field;
  for (const auto& [name, t] : b.extra) d[py::str(name)] = t;
  return d;
}

/// A batch from a dict of tensors: the Batch fields by name (images,
/// input_ids, labels, padding_mask, ...), every other key into `extra`.
inline Batch dict_to_batch(const py::handle& item) {
  TORCH_CHECK_TYPE(py::isinstance<py::dict>(item), "Trainer: expected each batch to be a dict of tensors, got ",
                   std::string(py::str(py::type::of(item).attr("__name__"))));
  Batch b;
  for (const auto& [key, value] : item.cast<py::dict>()) {
    TORCH_CHECK_TYPE(py::isinstance<py::str>(key), "Trainer: batch keys must be strings");
    const auto name = key.cast<std::string>();
    if (value.is_none()) continue;
    TORCH_CHECK_TYPE(THPVariable_Check(value.ptr()), "Trainer: batch['", name, "'] must be a tensor, got ",
                     std::string(py::str(py::type::of(value).attr("__name__"))));
    auto t = value.cast<torch::Tensor>();
    const auto& fields = batch_fields();
    auto it = std::find_if(fields.begin(), fields.end(), [&](const auto& f) { return name == f.first; });
    if (it != fields.end()) b.*(it->second) = t;
    else b.extra[name] = t;
  }
  TORCH_CHECK_VALUE(b.images.defined() || b.input_ids.defined() || !b.extra.empty(),
                    "Trainer: a batch dict holds no tensor");
  return b;
}

/// torch's printer of the module tree (our pretty_print overrides).
inline std::string module_repr(const torch::nn::Module& module) {
  std::ostringstream stream;
  stream << module;
  return stream.str();
}

template <class Impl>
using ModuleClass = py::class_<Impl, torch::nn::Module, std::shared_ptr<Impl>>;

/// Registers torch::nn::Module as a pybind base class unless libtorch_python
/// already did (LibTorch 1.x does, 2.x no longer binds the C++ frontend).
inline void ensure_module_base(py::module_& m) {
  if (py::detail::get_type_info(typeid(torch::nn::Module))) return;
  py::class_<torch::nn::Module, std::shared_ptr<torch::nn::Module>>(m, "Module");
}

/// Casts for slot base classes (ProjectorModule, ...): a child whose own class
/// is not bound (a registered implementation) reaches Python as its slot's
/// class instead of a bare torch::nn::Module. Each slot's binding adds one.
using ModuleCaster = std::function<py::object(const std::shared_ptr<torch::nn::Module>&)>;
inline std::vector<ModuleCaster>& slot_casters() {
  static std::vector<ModuleCaster> casters;
  return casters;
}

/// The Python object of a C++ module: its own bound class, else its slot's.
inline py::object cast_module(const std::shared_ptr<torch::nn::Module>& module) {
  if (module && !py::detail::get_type_info(typeid(*module))) {
    for (const auto& cast : slot_casters()) {
      py::object out = cast(module);
      if (!out.is_none()) return out;
    }
  }
  return py::cast(module);
}

/// Registers the caster of slot base `Base` (see slot_casters).
template <class Base>
void add_slot_caster() {
  slot_casters().push_back([](const std::shared_ptr<torch::nn::Module>& module) -> py::object {
    if (auto base = std::dynamic_pointer_cast<Base>(module)) return py::cast(base);
    return py::none();
  });
}

/// `types_name()`: a slot registry's rows (name, python_class, doc, defaults).
template <class Registry>
void bind_slot_types(py::module_& m, Registry& registry, const char* types_name) {
  m.def(
      types_name,
      [&registry] {
        py::list out;
        for (const auto& row : registry.rows()) {
          py::dict d;
          d["name"] = row.name;
          d["python_class"] = row.python_class;
          d["doc"] = row.doc;
          d["defaults"] = to_python(row.defaults);
          d["fields"] = row.fields;
          out.append(d);
        }
        return out;
      },
      ("The registered " + std::string(registry.what()) +
       "s: name, python_class, doc, their option defaults and the fields in declaration order, sorted by "
       "name.").c_str());
}

/// `make_name(type, <widths>..., options_json)` and `types_name()` for a slot
/// registry whose rows take the widths `Args` (`names`: their Python names).
template <class Module, class... Args, class... Names>
void bind_slot_registry(py::module_& m, SlotRegistry<Module, Args...>& registry, const char* make_name,
                        const char* types_name, Names... names) {
  static_assert(sizeof...(Args) == sizeof...(Names), "one Python name per width");
  m.def(
      make_name,
      [&registry](const std::string& type, Args... widths, const std::string& options_json) {
        const auto& row = registry.at(type);
        auto options = parse_json(options_json, std::string(registry.what()) + " options");
        TORCH_CHECK_VALUE(options.is_object() && !options.contains("type"), row.python_class,
                          ": expected keyword options, not a type");
        return row.make(options, row.python_class, widths...);
      },
      py::arg("type"), py::arg(names)..., py::arg("options_json") = "{}",
      ("Builds the registered " + std::string(registry.what()) + " `type` (see " + types_name +
       ") from its keyword options.").c_str());
  bind_slot_types(m, registry, types_name);
}

/// `name()`: the rows of a table, each as the dict `describe(row)` fills.
template <class Table, class Describe>
void bind_table(py::module_& m, const Table& table, const char* name, const char* doc, Describe describe) {
  m.def(
      name,
      [&table, describe] {
        py::list out;
        for (const auto& row : table.rows()) {
          py::dict d;
          d["name"] = row.name;
          d["doc"] = row.doc;
          describe(row, d);
          out.append(d);
        }
        return out;
      },
      doc);
}

template <class Items>
py::dict to_dict(const Items& items);

/// A module's children by name, each as its own bound class or its slot's.
inline py::dict children_dict(torch::nn::Module& module) {
  py::dict out;
  for (const auto& item : module.named_children()) out[py::str(item.key())] = cast_module(item.value());
  return out;
}

template <class Items>
py::dict to_dict(const Items& items) {
  py::dict out;
  for (const auto& item : items) out[py::str(item.key())] = item.value();
  return out;
}

/// A C++ module as a pybind class with what vlmkit.CppModule (Python) needs:
/// parameters and buffers by dotted name, children, train mode and a tree
/// repr. The torch.nn.Module face is built in Python on top of this, the same
/// way on every LibTorch version (no dependence on torch.nn.cpp).
template <class Impl>
ModuleClass<Impl> bind_block(py::module_& m, const char* name) {
  // multiple_inheritance: Cloneable blocks derive from torch::nn::Module virtually,
  // so pybind must adjust the pointer when it passes one as a torch::nn::Module&.
  ModuleClass<Impl> cls(m, name, py::multiple_inheritance());
  cls.def("named_parameters", [](Impl& self, bool recurse) { return to_dict(self.named_parameters(recurse)); },
          py::arg("recurse") = true)
      .def("named_buffers", [](Impl& self, bool recurse) { return to_dict(self.named_buffers(recurse)); },
           py::arg("recurse") = true)
      .def("named_children", [](Impl& self) { return children_dict(self); })
      .def("train", [](Impl& self, bool mode) { self.train(mode); }, py::arg("mode") = true)
      .def_property_readonly("training", [](Impl& self) { return self.is_training(); })
      .def("_tree_repr", [](Impl& self) { return module_repr(self); });
  return cls;
}

/// The base class of a module slot, with the `options` (its config less the
/// type) and `config_json` every slot class has.
template <class Base>
ModuleClass<Base> bind_slot_base(py::module_& m, const char* name) {
  add_slot_caster<Base>();
  auto cls = bind_block<Base>(m, name);
  cls.def_property_readonly("options",
                            [](Base& self) {
                              auto j = self.config();
                              j.erase("type");
                              return to_python(j);
                            })
      .def("config_json", [](Base& self) { return self.config().dump(); });
  return cls;
}

/// Functions on any C++ module, whatever its Python class (a bound vlmkit
/// block or the plain torch::nn::Module of a ModuleList, Conv2d, ... child):
/// what vlmkit.CppModule needs to present the module tree to Python.
inline void bind_module_functions(py::module_& m) {
  using Module = torch::nn::Module;
  m.def("_module_parameters", [](Module& self, bool recurse) { return to_dict(self.named_parameters(recurse)); },
        py::arg("module"), py::arg("recurse") = true);
  m.def("_module_buffers", [](Module& self, bool recurse) { return to_dict(self.named_buffers(recurse)); },
        py::arg("module"), py::arg("recurse") = true);
  m.def("_module_children", [](Module& self) { return children_dict(self); }, py::arg("module"));
  m.def("_module_name", [](Module& self) { return self.name(); }, py::arg("module"));
  m.def("_module_address", [](Module& self) { return reinterpret_cast<uintptr_t>(&self); }, py::arg("module"));
  m.def("_module_train", [](Module& self, bool mode) { self.train(mode); }, py::arg("module"), py::arg("mode"));
  m.def("_module_training", [](Module& self) { return self.is_training(); }, py::arg("module"));
  m.def("_module_repr", [](Module& self) { return module_repr(self); }, py::arg("module"));
}

/// Adds `options` (a dict) for modules with an options struct.
template <class Impl, class Cls>
void add_options(Cls& cls) {
  cls.def_property_readonly("options",
                            [](Impl& self) { return to_python(options_to_json(self.options)); });
}

void bind_blocks(py::module_& m);
void bind_models(py::module_& m);
void bind_generative(py::module_& m);
void bind_train(py::module_& m);
void bind_data(py::module_& m);  // OpenCV component only

}  // namespace vlmkit::bindings
