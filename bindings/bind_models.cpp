// Bindings of the architectures built by name from a JSON config.
#include "common.h"
#include "vlmkit/models/build.h"

namespace vlmkit::bindings {

using Release = py::call_guard<py::gil_scoped_release>;

void bind_models(py::module_& m) {
  py::class_<TwoTowerOutput>(m, "TwoTowerOutput")
      .def_readonly("image_embeds", &TwoTowerOutput::image_embeds)
      .def_readonly("text_embeds", &TwoTowerOutput::text_embeds)
      .def_readonly("logits_per_image", &TwoTowerOutput::logits_per_image)
      .def_readonly("logits_per_text", &TwoTowerOutput::logits_per_text)
      .def_readonly("loss", &TwoTowerOutput::loss)
      .def("__repr__", [](const TwoTowerOutput& o) {
        return "TwoTowerOutput(batch=" + std::to_string(o.image_embeds.size(0)) +
               ", loss=" + std::to_string(o.loss.item<double>()) + ")";
      });

  py::class_<TwoLegOutput>(m, "TwoLegOutput")
      .def_readonly("logits", &TwoLegOutput::logits)
      .def_readonly("fused", &TwoLegOutput::fused)
      .def_property_readonly("loss", [](const TwoLegOutput& o) { return defined_or_none(o.loss); });

  using TwoTowerAny = TwoTowerImpl<>;
  bind_block<TwoTowerAny>(m, "TwoTower")
      .def(py::init([](const std::string& config) { return make_two_tower(parse_json(config)); }),
           py::arg("config_json"))
      .def(
          "forward",
          [](TwoTowerAny& self, const torch::Tensor& images, const torch::Tensor& ids, const OptTensor& mask,
             const OptTensor& image_sizes) {
            return self.forward(images, ids, value_or_undefined(mask), value_or_undefined(image_sizes));
          },
          py::arg("images"), py::arg("token_ids"), py::arg("padding_mask") = py::none(),
          py::arg("image_sizes") = py::none(), Release())
      .def(
          "encode_image",
          [](TwoTowerAny& self, const torch::Tensor& images, const OptTensor& image_sizes) {
            return self.encode_image(images, value_or_undefined(image_sizes));
          },
          py::arg("images"), py::arg("image_sizes") = py::none(), Release())
      .def(
          "encode_text",
          [](TwoTowerAny& self, const torch::Tensor& ids, const OptTensor& mask) {
            return self.encode_text(ids, value_or_undefined(mask));
          },
          py::arg("token_ids"), py::arg("padding_mask") = py::none(), Release())
      .def("scale", &TwoTowerAny::scale, "exp(logit_scale) clamped to max_logit_scale")
      .def("similarity", &TwoTowerAny::similarity, py::arg("image_embeds"), py::arg("text_embeds"))
      .def(
          "zero_shot",
          [](TwoTowerAny& self, const torch::Tensor& images, const torch::Tensor& ids, const OptTensor& mask,
             const OptTensor& image_sizes) {
            return self.zero_shot(images, ids, value_or_undefined(mask), value_or_undefined(image_sizes));
          },
          py::arg("images"), py::arg("prompt_ids"), py::arg("prompt_padding_mask") = py::none(),
          py::arg("image_sizes") = py::none(), Release())
      .def("config_json", [](TwoTowerAny& self) { return self.config().dump(); });

  using TwoLegAny = TwoLegImpl<>;
  bind_block<TwoLegAny>(m, "TwoLeg")
      .def(py::init([](const std::string& config) { return make_two_leg(parse_json(config)); }),
           py::arg("config_json"))
      .def(
          "forward",
          [](TwoLegAny& self, const torch::Tensor& images, const torch::Tensor& ids,
             const OptTensor& mask, const OptTensor& labels, const OptTensor& image_sizes) {
            return self.forward(images, ids, value_or_undefined(mask), value_or_undefined(labels),
                                value_or_undefined(image_sizes));
          },
          py::arg("images"), py::arg("token_ids"), py::arg("padding_mask") = py::none(),
          py::arg("labels") = py::none(), py::arg("image_sizes") = py::none(), Release())
      .def("config_json", [](TwoLegAny& self) { return self.config().dump(); });

  m.def(
      "default_config",
      [](const std::string& architecture) {
        json config = {{"architecture", architecture}};
        return model_config(*build_model(config)).dump();
      },
      py::arg("architecture"), "The complete default config of an architecture, as JSON text.");
  bind_table(m, architecture_table(), "architecture_types",
             "The registered architectures (config \"architecture\"): name, python_class and doc, sorted by name.",
             [](const ArchitectureRow& row, py::dict& d) { d["python_class"] = row.python_class; });
}

}  // namespace vlmkit::bindings
