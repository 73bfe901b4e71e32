// Bindings of the building blocks: attention, transformer block, encoders,
// fusion blocks, heads and losses. No model logic here.
#include "common.h"
#include "vlmkit/fusion/two_leg_fusion.h"
#include "vlmkit/losses/losses.h"
#include "vlmkit/modules/heads.h"
#include "vlmkit/modules/text_encoder.h"
#include "vlmkit/modules/vit.h"

namespace vlmkit::bindings {
namespace {

using Release = py::call_guard<py::gil_scoped_release>;

template <class Options>
Options options_from_kwargs(Options options, const py::kwargs& kwargs, const char* who) {
  read_options(to_json(kwargs), who, options, {});
  return options;
}

template <class Impl, class Options>
void bind_image_encoder(py::module_& m, const char* name) {
  auto cls = bind_block<Impl>(m, name);
  add_options<Impl>(cls);
  cls.def(py::init([name](const py::kwargs& kwargs) {
            return std::make_shared<Impl>(options_from_kwargs(Options(), kwargs, name));
          }))
      .def(
          "forward",
          [](Impl& self, const torch::Tensor& images, const OptTensor& image_sizes) {
            return self.forward(images, value_or_undefined(image_sizes));
          },
          py::arg("images"), py::arg("image_sizes") = py::none(), Release(),
          "images [B, C, H, W]; image_sizes [B, 2] int64 (height, width) for variable-size images "
          "zero-padded into the batch: padded tokens are masked (padding_mask).")
      .def("output_dim", &Impl::output_dim)
      .def("config_json", [](Impl& self) { return self.config().dump(); });
}

}  // namespace

void bind_blocks(py::module_& m) {
  py::class_<EncoderOutput>(m, "EncoderOutput",
                            "What an encoder returns: tokens [B, N, D], pooled [B, D], "
                            "padding_mask [B, N] (True = padding) or None, grid (rows, cols).")
      .def(py::init([](torch::Tensor tokens, torch::Tensor pooled, OptTensor padding_mask) {
             EncoderOutput out;
             out.tokens = std::move(tokens);
             out.pooled = std::move(pooled);
             out.padding_mask = value_or_undefined(padding_mask);
             return out;
           }),
           py::arg("tokens"), py::arg("pooled"), py::arg("padding_mask") = py::none())
      .def_property_readonly("tokens", [](const EncoderOutput& o) { return o.tokens; })
      .def_property_readonly("pooled", [](const EncoderOutput& o) { return o.pooled; })
      .def_property_readonly("padding_mask",
                             [](const EncoderOutput& o) { return defined_or_none(o.padding_mask); })
      .def_property_readonly("grid", [](const EncoderOutput& o) {
        return py::make_tuple(o.grid[0], o.grid[1]);
      });

  {
    auto cls = bind_block<MultiheadAttentionImpl>(m, "MultiheadAttention");
    add_options<MultiheadAttentionImpl>(cls);
    cls.def(py::init([](int64_t embed_dim, int64_t num_heads, const py::kwargs& kwargs) {
              return std::make_shared<MultiheadAttentionImpl>(options_from_kwargs(
                  MultiheadAttentionOptions(embed_dim, num_heads), kwargs, "MultiheadAttention"));
            }),
            py::arg("embed_dim"), py::arg("num_heads"))
        .def(
            "forward",
            [](MultiheadAttentionImpl& self, const torch::Tensor& x, const OptTensor& context,
               const OptTensor& key_padding_mask, const OptTensor& attn_mask, bool causal) {
              return self.forward(x, value_or_undefined(context),
                                  value_or_undefined(key_padding_mask),
                                  value_or_undefined(attn_mask), causal);
            },
            py::arg("x"), py::arg("context") = py::none(),
            py::arg("key_padding_mask") = py::none(), py::arg("attn_mask") = py::none(),
            py::arg("causal") = false, Release());
  }
  {
    auto cls = bind_block<TransformerBlockImpl>(m, "TransformerBlock");
    add_options<TransformerBlockImpl>(cls);
    cls.def(py::init([](int64_t d_model, int64_t num_heads, const py::kwargs& kwargs) {
              return std::make_shared<TransformerBlockImpl>(options_from_kwargs(
                  TransformerBlockOptions(d_model, num_heads), kwargs, "TransformerBlock"));
            }),
            py::arg("d_model"), py::arg("num_heads"))
        .def(
            "forward",
            [](TransformerBlockImpl& self, const torch::Tensor& x, const OptTensor& kpm,
               const OptTensor& attn_mask, bool causal, const OptTensor& context,
               const OptTensor& context_padding_mask) {
              return self.forward(x, value_or_undefined(kpm), value_or_undefined(attn_mask),
                                  causal, value_or_undefined(context),
                                  value_or_undefined(context_padding_mask));
            },
            py::arg("x"), py::arg("key_padding_mask") = py::none(),
            py::arg("attn_mask") = py::none(), py::arg("causal") = false,
            py::arg("context") = py::none(), py::arg("context_padding_mask") = py::none(),
            Release());
  }

  bind_slot_types(m, image_encoder_registry(), "image_encoder_types");
  bind_slot_types(m, text_encoder_registry(), "text_encoder_types");
  bind_image_encoder<ViTImpl, ViTOptions>(m, "ViT");
  bind_image_encoder<ConvStageImpl, ConvStageOptions>(m, "ConvStage");
  {
    auto cls = bind_block<TextEncoderImpl>(m, "TextEncoder");
    add_options<TextEncoderImpl>(cls);
    cls.def(py::init([](const py::kwargs& kwargs) {
              return std::make_shared<TextEncoderImpl>(
                  options_from_kwargs(TextEncoderOptions(), kwargs, "TextEncoder"));
            }))
        .def(
            "forward",
            [](TextEncoderImpl& self, const torch::Tensor& ids, const OptTensor& mask) {
              return self.forward(ids, value_or_undefined(mask));
            },
            py::arg("token_ids"), py::arg("padding_mask") = py::none(), Release())
        .def("output_dim", &TextEncoderImpl::output_dim)
        .def("config_json", [](TextEncoderImpl& self) { return self.config().dump(); });
  }

  // The Two-Leg fusion slot: one class for every fusion (the registry's rows).
  bind_slot_base<FusionModule>(m, "Fusion")
      .def("forward", &FusionModule::forward, py::arg("image"), py::arg("text"), Release())
      .def("output_dim", &FusionModule::output_dim);
  bind_slot_registry(m, fusion_registry(), "make_fusion", "fusion_types", "image_dim", "text_dim");

  // The Two-Leg head slot: one class for every head (the registry's rows).
  bind_slot_base<HeadModule>(m, "Head")
      .def("forward", &HeadModule::forward, py::arg("x"), Release())
      .def("loss", &HeadModule::loss, py::arg("logits"), py::arg("labels"), py::arg("label_smoothing") = 0.0)
      .def("input_dim", &HeadModule::input_dim);
  bind_slot_registry(m, head_registry(), "make_head", "head_types", "in_dim");
  bind_table(m, contrastive_loss_table(), "contrastive_loss_types",
             "The registered Two-Tower losses (config \"loss\"): name, doc, learned_bias, sorted by name.",
             [](const ContrastiveLossRow& row, py::dict& d) { d["learned_bias"] = row.learned_bias; });

  bind_block<ClipLossImpl>(m, "ClipLoss")
      .def(py::init<>())
      .def("forward", &ClipLossImpl::forward, py::arg("logits_per_image"));
  bind_block<SigLipLossImpl>(m, "SigLipLoss")
      .def(py::init<>())
      .def("forward", &SigLipLossImpl::forward, py::arg("logits_per_image"));
  bind_block<ClassificationLossImpl>(m, "ClassificationLoss")
      .def(py::init<double>(), py::arg("label_smoothing") = 0.0)
      .def("forward", &ClassificationLossImpl::forward, py::arg("logits"), py::arg("labels"));
  bind_block<MatchingLossImpl>(m, "MatchingLoss")
      .def(py::init<>())
      .def("forward", &MatchingLossImpl::forward, py::arg("logits"), py::arg("labels"));

  m.def("clip_loss", &clip_loss, py::arg("logits_per_image"));
  m.def("siglip_loss", &siglip_loss, py::arg("logits_per_image"));
  m.def("classification_loss", &classification_loss, py::arg("logits"), py::arg("labels"),
        py::arg("label_smoothing") = 0.0);
  m.def("matching_loss", &matching_loss, py::arg("logits"), py::arg("labels"));
}

}  // namespace vlmkit::bindings
