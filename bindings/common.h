#pragma once
// Shared helpers for the bindings: kwargs <-> JSON, optional tensors, and the
// binding of a module with its Python-visible options and repr.
#include <pybind11/stl.h>
#include <torch/python.h>

#include <optional>
#include <sstream>

#include "vlmkit/config.h"
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

/// torch's printer of the module tree (our pretty_print overrides).
inline std::string module_repr(const torch::nn::Module& module) {
  std::ostringstream stream;
  stream << module;
  return stream.str();
}

/// bind_module without the generic forward (we bind forward ourselves with
/// keyword arguments and optional tensors), plus __repr__.
template <class Impl>
torch::python::detail::PyModuleClass<Impl> bind_block(py::module_& m, const char* name) {
  auto cls = torch::python::bind_module<Impl, /*force_enable=*/true>(m, name);
  // torch binds __repr__ to the bare name first and pybind keeps the first
  // overload, so the tree printer gets its own name (the Python mixin uses it).
  cls.def("_tree_repr", [](Impl& self) { return module_repr(self); });
  return cls;
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

}  // namespace vlmkit::bindings
