// Bindings of the generative half: decoder, projectors, architectures 3 and
// 4, generation (with JSON-schema constraints and streaming), tokenizer, boxes.
#include "common.h"
#include "vlmkit/data/tokenizer.h"
#include "vlmkit/generate/boxes.h"
#include "vlmkit/generate/polygons.h"
#include "vlmkit/generate/json_schema.h"
#include "vlmkit/models/build.h"

namespace vlmkit::bindings {
namespace {

using Release = py::call_guard<py::gil_scoped_release>;

std::shared_ptr<const std::vector<std::string>> byte_token_texts() {
  static const auto texts = [] {
    ByteTokenizer tokenizer;
    auto out = std::make_shared<std::vector<std::string>>();
    for (int64_t v = 0; v < tokenizer.vocab_size(); ++v) out->push_back(tokenizer.token_text(v));
    return out;
  }();
  return texts;
}

GenerationOptions generation_options(int64_t max_new_tokens, bool do_sample, double temperature,
                                     int64_t top_k, double top_p, int64_t num_beams,
                                     double length_penalty, const std::optional<std::vector<int64_t>>& stop_tokens,
                                     bool use_cache, int64_t seed, int64_t pad_id) {
  GenerationOptions o;
  o.max_new_tokens(max_new_tokens).do_sample(do_sample).temperature(temperature).top_k(top_k)
      .top_p(top_p).num_beams(num_beams).length_penalty(length_penalty).use_cache(use_cache)
      .seed(seed).pad_id(pad_id);
  if (stop_tokens) o.stop_tokens(*stop_tokens);
  return o;
}

/// Schema text -> factory of constraints over the byte tokenizer's vocabulary.
ConstraintFactory schema_constraint(const std::optional<std::string>& schema, int64_t stop_token,
                                    int64_t vocab_size) {
  if (!schema) return nullptr;
  ordered_json parsed;
  try {
    parsed = ordered_json::parse(*schema);
  } catch (const ordered_json::exception& e) {  // parse errors and number overflow
    TORCH_CHECK_VALUE(false, "schema is not valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(vocab_size >= ByteTokenizer().vocab_size(),
                    "constrained decoding needs the byte tokenizer's vocabulary (",
                    ByteTokenizer().vocab_size(), " tokens); the decoder has ", vocab_size);
  JsonSchemaMatcher check(parsed);  // raises on unsupported schemas before generating
  auto texts = byte_token_texts();
  return [parsed, texts, stop_token]() -> std::unique_ptr<TokenConstraint> {
    return std::make_unique<JsonSchemaConstraint>(parsed, texts, stop_token);
  };
}

/// Python callable(list[int]) -> None/bool, called with the GIL held.
TokenCallback python_callback(const py::object& stream) {
  if (stream.is_none()) return nullptr;
  auto fn = std::make_shared<py::object>(stream);
  return [fn](const std::vector<int64_t>& tokens) {
    py::gil_scoped_acquire gil;
    py::object result = (*fn)(tokens);
    return result.is_none() || result.cast<bool>();
  };
}

/// The shared tail of both architectures' generate_ids: constraint, stream
/// callback, generation without the GIL, (tokens, scores) back to Python.
template <class Run>
py::tuple run_generation(const TextDecoderImpl& decoder, const GenerationOptions& options,
                         const std::optional<std::string>& schema, const py::object& stream, Run&& run) {
  auto constraint = schema_constraint(schema, options.stop_tokens().front(), decoder.options.vocab_size());
  auto callback = python_callback(stream);
  GenerationOutput out;
  {
    py::gil_scoped_release release;
    out = run(options, constraint, callback);
  }
  return py::make_tuple(out.tokens, out.scores);
}

/// The projector slot: one class for every projector (the registry's rows
/// are built through make_projector and listed by projector_types).
void bind_projectors(py::module_& m) {
  add_slot_caster<ProjectorModule>();
  bind_block<ProjectorModule>(m, "Projector")
      .def("forward", &ProjectorModule::forward, py::arg("image"), Release())
      .def("num_output_tokens", &ProjectorModule::num_output_tokens, py::arg("rows"), py::arg("cols"))
      .def_property_readonly("input_dim", &ProjectorModule::input_dim)
      .def_property_readonly("output_dim", &ProjectorModule::output_dim)
      .def_property_readonly("options",
                             [](ProjectorModule& self) {
                               auto j = self.config();
                               j.erase("type");
                               j["in_dim"] = self.input_dim();
                               j["out_dim"] = self.output_dim();
                               return to_python(j);
                             })
      .def("config_json", [](ProjectorModule& self) { return self.config().dump(); });
  bind_slot_registry(m, projector_registry(), "make_projector", "projector_types", "in_dim", "out_dim");
}

}  // namespace

void bind_generative(py::module_& m) {
  py::class_<DecoderOutput>(m, "DecoderOutput",
                            "logits [B, L, V], loss (None without labels), labels and padding_mask "
                            "of the fused sequence [B, L].")
      .def_readonly("logits", &DecoderOutput::logits)
      .def_property_readonly("loss", [](const DecoderOutput& o) { return defined_or_none(o.loss); })
      .def_property_readonly("labels", [](const DecoderOutput& o) { return defined_or_none(o.labels); })
      .def_readonly("padding_mask", &DecoderOutput::padding_mask);

  {
    auto cls = bind_block<TextDecoderImpl>(m, "TextDecoder");
    add_options<TextDecoderImpl>(cls);
    cls.def(py::init([](const py::kwargs& kwargs) {
              TextDecoderOptions o;
              read_options(to_json(kwargs), "TextDecoder", o, {});
              return std::make_shared<TextDecoderImpl>(o);
            }))
        .def(
            "forward",
            [](TextDecoderImpl& self, const torch::Tensor& embeds, const OptTensor& padding_mask,
               const OptTensor& positions, const OptTensor& attn_mask, const OptTensor& context,
               const OptTensor& context_mask) {
              return self.forward(embeds, value_or_undefined(padding_mask), value_or_undefined(positions),
                                  value_or_undefined(attn_mask), value_or_undefined(context),
                                  value_or_undefined(context_mask));
            },
            py::arg("embeds"), py::arg("padding_mask") = py::none(), py::arg("positions") = py::none(),
            py::arg("attn_mask") = py::none(), py::arg("context") = py::none(),
            py::arg("context_mask") = py::none(), Release())
        .def("embed", &TextDecoderImpl::embed, py::arg("token_ids"))
        .def("logits", &TextDecoderImpl::logits, py::arg("hidden"))
        .def("config_json", [](TextDecoderImpl& self) { return self.config().dump(); });
  }

  bind_projectors(m);
  m.def("decoder_fusion_names", &enum_names<DecoderFusionType>, "The decoder fusions' config names.");

  using EncDec = EncoderDecoderImpl<>;
  bind_block<EncDec>(m, "EncoderDecoder")
      .def(py::init([](const std::string& config) { return make_encoder_decoder(parse_json(config)); }),
           py::arg("config_json"))
      .def(
          "forward",
          [](EncDec& self, const torch::Tensor& images, const torch::Tensor& ids, const OptTensor& mask,
             const OptTensor& labels, const OptTensor& image_sizes, const OptTensor& segment_ids) {
            return self.forward(images, ids, value_or_undefined(mask), value_or_undefined(labels),
                                value_or_undefined(image_sizes), value_or_undefined(segment_ids));
          },
          py::arg("images"), py::arg("input_ids"), py::arg("padding_mask") = py::none(),
          py::arg("labels") = py::none(), py::arg("image_sizes") = py::none(),
          py::arg("segment_ids") = py::none(), Release())
      .def(
          "encode_images",
          [](EncDec& self, const torch::Tensor& images, const OptTensor& image_sizes) -> py::object {
            if (!image_sizes) {
              torch::Tensor tokens;
              {
                py::gil_scoped_release release;
                tokens = self.encode_images(images);
              }
              return py::cast(tokens);
            }
            std::pair<torch::Tensor, torch::Tensor> out;
            {
              py::gil_scoped_release release;
              out = self.encode_images(images, *image_sizes);
            }
            return py::make_tuple(out.first, out.second.defined() ? py::cast(out.second) : py::none());
          },
          py::arg("images"), py::arg("image_sizes") = py::none(),
          "images [I, C, H, W] -> image tokens [I, M, D]; with image_sizes [I, 2] (variable-size "
          "images, zero-padded), returns (tokens, padding_mask [I, M] or None).")
      .def(
          "generate_ids",
          [](EncDec& self, const torch::Tensor& images, const std::vector<std::vector<int64_t>>& prompts,
             int64_t max_new_tokens, bool do_sample, double temperature, int64_t top_k, double top_p,
             int64_t num_beams, double length_penalty, const std::optional<std::vector<int64_t>>& stop_tokens,
             bool use_cache, int64_t seed, const std::optional<std::string>& schema, const py::object& stream,
             const OptTensor& image_sizes) {
            auto o = generation_options(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                                        length_penalty, stop_tokens, use_cache, seed,
                                        self.decoder->options.pad_id());
            return run_generation(*self.decoder, o, schema, stream, [&](auto& opts, auto& constraint, auto& callback) {
              return self.generate(images, prompts, opts, constraint, callback, value_or_undefined(image_sizes));
            });
          },
          py::arg("images"), py::arg("prompts"), py::arg("max_new_tokens") = 32, py::arg("do_sample") = false,
          py::arg("temperature") = 1.0, py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("num_beams") = 1,
          py::arg("length_penalty") = 1.0, py::arg("stop_tokens") = py::none(), py::arg("use_cache") = true,
          py::arg("seed") = -1, py::arg("schema") = py::none(), py::arg("stream") = py::none(),
          py::arg("image_sizes") = py::none())
      .def("config_json", [](EncDec& self) { return self.config().dump(); });

  using EncTextDec = EncoderTextDecoderImpl<>;
  bind_block<EncTextDec>(m, "EncoderTextDecoder")
      .def(py::init([](const std::string& config) { return make_encoder_text_decoder(parse_json(config)); }),
           py::arg("config_json"))
      .def(
          "forward",
          [](EncTextDec& self, const torch::Tensor& images, const torch::Tensor& context_ids,
             const torch::Tensor& ids, const OptTensor& context_mask, const OptTensor& mask,
             const OptTensor& labels, const OptTensor& segment_ids) {
            return self.forward(images, context_ids, ids, value_or_undefined(context_mask),
                                value_or_undefined(mask), value_or_undefined(labels),
                                value_or_undefined(segment_ids));
          },
          py::arg("images"), py::arg("context_ids"), py::arg("input_ids"),
          py::arg("context_padding_mask") = py::none(), py::arg("padding_mask") = py::none(),
          py::arg("labels") = py::none(), py::arg("segment_ids") = py::none(), Release())
      .def(
          "generate_ids",
          [](EncTextDec& self, const torch::Tensor& images, const torch::Tensor& context_ids,
             const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens, bool do_sample,
             double temperature, int64_t top_k, double top_p, int64_t num_beams, double length_penalty,
             const std::optional<std::vector<int64_t>>& stop_tokens, bool use_cache, int64_t seed,
             const std::optional<std::string>& schema, const py::object& stream, const OptTensor& context_mask) {
            auto o = generation_options(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                                        length_penalty, stop_tokens, use_cache, seed,
                                        self.decoder->options.pad_id());
            return run_generation(*self.decoder, o, schema, stream, [&](auto& opts, auto& constraint, auto& callback) {
              return self.generate(images, context_ids, prompts, opts, constraint, callback,
                                   value_or_undefined(context_mask));
            });
          },
          py::arg("images"), py::arg("context_ids"), py::arg("prompts"), py::arg("max_new_tokens") = 32,
          py::arg("do_sample") = false, py::arg("temperature") = 1.0, py::arg("top_k") = 0,
          py::arg("top_p") = 1.0, py::arg("num_beams") = 1, py::arg("length_penalty") = 1.0,
          py::arg("stop_tokens") = py::none(), py::arg("use_cache") = true, py::arg("seed") = -1,
          py::arg("schema") = py::none(), py::arg("stream") = py::none(),
          py::arg("context_padding_mask") = py::none())
      .def("config_json", [](EncTextDec& self) { return self.config().dump(); });

  py::class_<ByteTokenizer>(m, "ByteTokenizer",
                            "Byte-level tokenizer: 0 <pad>, 1 <bos>, 2 <eos>, 3 <image>, bytes from 8.")
      .def(py::init<>())
      .def("encode", &ByteTokenizer::encode, py::arg("text"), py::arg("add_bos") = true,
           py::arg("add_eos") = false)
      .def("decode", &ByteTokenizer::decode, py::arg("ids"), py::arg("skip_special") = true)
      .def("decode_bytes",
           [](const ByteTokenizer& t, const std::vector<int64_t>& ids) { return py::bytes(t.decode(ids)); },
           py::arg("ids"))
      .def_property_readonly("vocab_size", &ByteTokenizer::vocab_size)
      .def_property_readonly("pad_id", [](const ByteTokenizer& t) { return t.special().pad; })
      .def_property_readonly("bos_id", [](const ByteTokenizer& t) { return t.special().bos; })
      .def_property_readonly("eos_id", [](const ByteTokenizer& t) { return t.special().eos; })
      .def_property_readonly("image_id", [](const ByteTokenizer& t) { return t.special().image; });

  py::class_<JsonSchemaMatcher>(m, "JsonSchemaMatcher",
                                "Character-level matcher of JSON valid under a schema (for inspection "
                                "and tests; generation uses it through schema=).")
      .def(py::init([](const std::string& schema) { return JsonSchemaMatcher(ordered_json::parse(schema)); }),
           py::arg("schema_json"))
      .def("feed", py::overload_cast<const std::string&>(&JsonSchemaMatcher::feed), py::arg("text"))
      .def("can_finish", &JsonSchemaMatcher::can_finish)
      .def_static("max_length", [](const std::string& schema) {
        return JsonSchemaMatcher::max_length(ordered_json::parse(schema));
      });

  m.def("box_to_text",
        [](const std::vector<double>& box, int64_t width, int64_t height) {
          TORCH_CHECK_VALUE(box.size() == 4, "box_to_text: expected [x1, y1, x2, y2], got ", box.size(), " values");
          return box_to_text({box[0], box[1], box[2], box[3]}, width, height);
        },
        py::arg("box"), py::arg("width"), py::arg("height"),
        "Pixel box -> '[x1,y1,x2,y2]' with coordinates normalised to 0..999.");
  m.def("parse_boxes",
        [](const std::string& text, int64_t width, int64_t height) {
          std::vector<std::vector<double>> out;
          for (const auto& b : parse_boxes(text, width, height)) out.push_back({b.x1, b.y1, b.x2, b.y2});
          return out;
        },
        py::arg("text"), py::arg("width"), py::arg("height"),
        "Every '[x1,y1,x2,y2]' (0..999) in text, mapped back to pixel boxes.");
  m.def("parse_polygons",
        [](const std::string& text, int64_t width, int64_t height) {
          std::vector<std::vector<double>> out;
          for (const auto& polygon : parse_polygons(text, width, height)) out.push_back(polygon_to_flat(polygon));
          return out;
        },
        py::arg("text"), py::arg("width"), py::arg("height"),
        "Every '[x1,y1,x2,y2,x3,y3,...]' (6 or more 0..999 integers) in text, as flat pixel polygons.");
}

}  // namespace vlmkit::bindings
