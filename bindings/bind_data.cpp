// Bindings of the OpenCV image pipeline. Images cross as [H, W, 3] uint8
// tensors; boxes as lists of [x1, y1, x2, y2] pixel coordinates.
#include "common.h"
#include "vlmkit/data/image.h"
#include "vlmkit/data/loader.h"
#include "vlmkit/data/masks.h"
#include "vlmkit/data/sentencepiece.h"
#include "vlmkit/data/synthetic.h"
#include "vlmkit/modules/encoder.h"

namespace vlmkit::bindings {
namespace {
using BoxList = std::vector<std::array<double, 4>>;

std::vector<Box> to_boxes(const std::optional<BoxList>& boxes) {
  std::vector<Box> out;
  if (boxes)
    for (const auto& b : *boxes) out.push_back({b[0], b[1], b[2], b[3]});
  return out;
}

BoxList from_boxes(const std::vector<Box>& boxes) {
  BoxList out;
  for (const auto& b : boxes) out.push_back({b.x1, b.y1, b.x2, b.y2});
  return out;
}

// Polygons cross as COCO does: flat lists [x1, y1, x2, y2, ...] of pixels.
using FlatPolygon = std::vector<double>;
using PolygonList = std::vector<FlatPolygon>;

std::vector<Polygon> to_polygons(const std::optional<PolygonList>& polygons, const char* who) {
  std::vector<Polygon> out;
  if (polygons)
    for (const auto& p : *polygons) out.push_back(polygon_from_flat(p, who));
  return out;
}

PolygonList from_polygons(const std::vector<Polygon>& polygons) {
  PolygonList out;
  for (const auto& p : polygons) out.push_back(polygon_to_flat(p));
  return out;
}

/// A [H, W] tensor (bool or integer; non-zero = inside) as a CV_8U 0/1 mask.
cv::Mat mask_from_tensor(const torch::Tensor& mask, const char* who) {
  TORCH_CHECK_VALUE(mask.defined() && mask.dim() == 2 && mask.numel() > 0 && !mask.is_floating_point() &&
                        !mask.is_complex(),
                    who, ": expected a non-empty [H, W] bool or integer mask, got ",
                    mask.defined() ? c10::str(mask.scalar_type(), " ", mask.sizes())
                                   : std::string("None"));
  auto m = mask.to(torch::kCPU).ne(0).to(torch::kUInt8).contiguous();
  cv::Mat out(int(m.size(0)), int(m.size(1)), CV_8UC1);
  std::memcpy(out.data, m.data_ptr<uint8_t>(), size_t(m.numel()));
  return out;
}

torch::Tensor mask_to_tensor(const cv::Mat& mask) {
  cv::Mat m = mask.isContinuous() ? mask : mask.clone();
  return torch::from_blob(m.data, {m.rows, m.cols}, torch::kUInt8).clone();
}

using Release = py::call_guard<py::gil_scoped_release>;
}  // namespace

void bind_data(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FileNotFoundError& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    }
  });
  m.attr("DEFAULT_MAX_PIXELS") = kDefaultMaxPixels;
  m.def("decode_image_bytes",
        [](const py::bytes& data, int64_t max_pixels) {
          std::string bytes = data;
          py::gil_scoped_release release;
          return image_to_tensor(decode_image(bytes, max_pixels));
        },
        py::arg("data"), py::arg("max_pixels") = kDefaultMaxPixels);
  m.def("load_image_file",
        [](const std::string& path, int64_t max_pixels) { return image_to_tensor(load_image(path, max_pixels)); },
        py::arg("path"), py::arg("max_pixels") = kDefaultMaxPixels, Release());
  m.def("decode_data_url",
        [](const std::string& url, int64_t max_pixels) { return image_to_tensor(decode_data_url(url, max_pixels)); },
        py::arg("url"), py::arg("max_pixels") = kDefaultMaxPixels, Release());
  m.def("image_from_tensor", [](const torch::Tensor& t) { return image_to_tensor(image_from_tensor(t)); },
        py::arg("image"));
  m.def("peek_image_size",
        [](const py::bytes& data) {
          auto s = peek_image_size(std::string(data));
          return py::make_tuple(s[0], s[1]);
        },
        py::arg("data"));
  m.def("resize_square",
        [](const torch::Tensor& img, int64_t size) { return image_to_tensor(resize_square(image_from_tensor(img), size)); },
        py::arg("image"), py::arg("size"));
  m.def("shortest_side_center_crop",
        [](const torch::Tensor& img, int64_t size) {
          return image_to_tensor(shortest_side_center_crop(image_from_tensor(img), size));
        },
        py::arg("image"), py::arg("size"));
  m.def("letterbox",
        [](const torch::Tensor& img, int64_t size, const std::optional<BoxList>& boxes, int fill) {
          LetterboxInfo info;
          auto out = letterbox(image_from_tensor(img), size, &info, fill);
          return py::make_tuple(image_to_tensor(out), from_boxes(letterbox_boxes(to_boxes(boxes), info)),
                                py::make_tuple(info.scale_x, info.scale_y, info.pad_x, info.pad_y));
        },
        py::arg("image"), py::arg("size"), py::arg("boxes") = py::none(), py::arg("fill") = 114);
  m.def("dynamic_resolution",
        [](int64_t h, int64_t w, int64_t patch, int64_t merge, int64_t min_pixels, int64_t max_pixels) {
          auto s = dynamic_resolution(h, w, patch, merge, min_pixels, max_pixels);
          return py::make_tuple(s[0], s[1]);
        },
        py::arg("height"), py::arg("width"), py::arg("patch") = 14, py::arg("merge") = 2,
        py::arg("min_pixels") = 56 * 56, py::arg("max_pixels") = 14 * 14 * 4 * 1280);
  m.def("resize_image",
        [](const torch::Tensor& img, int64_t height, int64_t width) {
          return image_to_tensor(resize_image(image_from_tensor(img), width, height));
        },
        py::arg("image"), py::arg("height"), py::arg("width"));
  m.def("collate_images",
        [](const std::vector<torch::Tensor>& images, int64_t multiple) {
          ImageBatch out;
          {
            py::gil_scoped_release release;
            out = collate_images(images, multiple);
          }
          return py::make_tuple(out.images, out.image_sizes);
        },
        py::arg("images"), py::arg("multiple") = 1);
  m.def("patch_padding_mask",
        [](const torch::Tensor& image_sizes, int64_t height, int64_t width, int64_t patch) {
          TORCH_CHECK_VALUE(patch >= 1 && height % patch == 0 && width % patch == 0,
                            "patch_padding_mask: height and width must be multiples of patch ", patch, ", got ",
                            height, "x", width);
          auto images = torch::empty({image_sizes.dim() ? image_sizes.size(0) : 0, 1, height, width});
          auto sizes = detail::check_image_sizes(image_sizes, images, patch, "patch_padding_mask");
          auto mask = detail::patch_padding_mask(sizes, height, width, patch, torch::kCPU);
          const int64_t b = sizes.size(0);
          return mask.defined() ? mask.view({b, height / patch, width / patch})
                                : torch::zeros({b, height / patch, width / patch}, torch::kBool);
        },
        py::arg("image_sizes"), py::arg("height"), py::arg("width"), py::arg("patch") = 1);
  m.def("tile_image",
        [](const torch::Tensor& img, int64_t tile, int64_t max_tiles, bool global_view) {
          std::array<int64_t, 2> grid{};
          auto tiles = tile_image(image_from_tensor(img), tile, max_tiles, global_view, &grid);
          std::vector<torch::Tensor> out;
          for (const auto& t : tiles) out.push_back(image_to_tensor(t));
          return py::make_tuple(out, py::make_tuple(grid[0], grid[1]));
        },
        py::arg("image"), py::arg("tile"), py::arg("max_tiles") = 4, py::arg("global_view") = true);
  m.def("to_chw",
        [](const torch::Tensor& img, const std::array<double, 3>& mean, const std::array<double, 3>& std) {
          Normalization n;
          n.mean = mean;
          n.std = std;
          return to_chw_tensor(image_from_tensor(img), n);
        },
        py::arg("image"), py::arg("mean"), py::arg("std"));
  m.def("normalization_preset",
        [](const std::string& name) {
          auto n = Normalization::preset(name);
          return py::make_tuple(n.mean, n.std);
        },
        py::arg("name"));
  m.def("horizontal_flip",
        [](const torch::Tensor& img, const std::optional<BoxList>& boxes,
           const std::optional<PolygonList>& polygons) -> py::tuple {
          auto b = to_boxes(boxes);
          auto p = to_polygons(polygons, "horizontal_flip");
          auto out = horizontal_flip(image_from_tensor(img), &b, &p);
          if (polygons) return py::make_tuple(image_to_tensor(out), from_boxes(b), from_polygons(p));
          return py::make_tuple(image_to_tensor(out), from_boxes(b));
        },
        py::arg("image"), py::arg("boxes") = py::none(), py::arg("polygons") = py::none(),
        "(image, boxes) mirrored; (image, boxes, polygons) when polygons are given.");
  m.def("random_resized_crop",
        [](const torch::Tensor& img, int64_t size, uint64_t seed, std::array<double, 2> scale,
           std::array<double, 2> ratio, const std::optional<BoxList>& boxes,
           const std::optional<PolygonList>& polygons) -> py::tuple {
          std::mt19937_64 rng(seed);
          auto b = to_boxes(boxes);
          auto p = to_polygons(polygons, "random_resized_crop");
          auto out = random_resized_crop(image_from_tensor(img), size, rng, scale, ratio, boxes ? &b : nullptr,
                                         polygons ? &p : nullptr);
          if (polygons) return py::make_tuple(image_to_tensor(out), from_boxes(b), from_polygons(p));
          return py::make_tuple(image_to_tensor(out), from_boxes(b));
        },
        py::arg("image"), py::arg("size"), py::arg("seed"), py::arg("scale") = std::array<double, 2>{0.5, 1.0},
        py::arg("ratio") = std::array<double, 2>{3.0 / 4.0, 4.0 / 3.0}, py::arg("boxes") = py::none(),
        py::arg("polygons") = py::none(),
        "(image, boxes) cropped and resized; (image, boxes, polygons) when polygons are given (an object cut off "
        "entirely leaves both lists).");
  m.def("color_jitter",
        [](const torch::Tensor& img, uint64_t seed, double brightness, double contrast, double saturation) {
          std::mt19937_64 rng(seed);
          return image_to_tensor(color_jitter(image_from_tensor(img), rng, brightness, contrast, saturation));
        },
        py::arg("image"), py::arg("seed"), py::arg("brightness") = 0.2, py::arg("contrast") = 0.2,
        py::arg("saturation") = 0.2);
  m.def("draw_boxes",
        [](const torch::Tensor& img, const BoxList& boxes, const std::vector<std::string>& labels) {
          return image_to_tensor(draw_boxes(image_from_tensor(img), to_boxes(boxes), labels));
        },
        py::arg("image"), py::arg("boxes"), py::arg("labels") = std::vector<std::string>{});
  // ---------------------------------------------------------------- masks
  m.def("mask_to_polygons",
        [](const torch::Tensor& mask, int64_t max_vertices) {
          return from_polygons(mask_to_polygons(mask_from_tensor(mask, "mask_to_polygons"), max_vertices));
        },
        py::arg("mask"), py::arg("max_vertices") = kDefaultMaxVertices,
        "Outlines of a [H, W] mask's parts (largest first), each at most max_vertices vertices, as flat pixel lists.");
  m.def("mask_to_polygon",
        [](const torch::Tensor& mask, int64_t max_vertices) {
          return polygon_to_flat(mask_to_polygon(mask_from_tensor(mask, "mask_to_polygon"), max_vertices));
        },
        py::arg("mask"), py::arg("max_vertices") = kDefaultMaxVertices,
        "The largest part's outline [x1, y1, x2, y2, ...] (pixels), at most max_vertices vertices.");
  m.def("polygon_to_mask",
        [](const PolygonList& polygons, int64_t height, int64_t width) {
          return mask_to_tensor(polygon_to_mask(to_polygons(polygons, "polygon_to_mask"), height, width));
        },
        py::arg("polygons"), py::arg("height"), py::arg("width"),
        "[H, W] uint8 mask (1 inside) of the union of the polygons: the pixels whose centres they cover.");
  m.def("simplify_polygon",
        [](const FlatPolygon& polygon, int64_t max_vertices) {
          return polygon_to_flat(simplify_polygon(polygon_from_flat(polygon, "simplify_polygon"), max_vertices));
        },
        py::arg("polygon"), py::arg("max_vertices") = kDefaultMaxVertices);
  m.def("decode_coco_rle",
        [](const py::object& counts, int64_t height, int64_t width) {
          if (py::isinstance<py::str>(counts) || py::isinstance<py::bytes>(counts))
            return mask_to_tensor(decode_coco_rle(counts.cast<std::string>(), height, width));
          return mask_to_tensor(decode_coco_rle(counts.cast<std::vector<int64_t>>(), height, width));
        },
        py::arg("counts"), py::arg("height"), py::arg("width"),
        "COCO RLE (counts as a list of runs or the compressed string) -> [H, W] uint8 mask.");
  m.def("encode_coco_rle",
        [](const torch::Tensor& mask) { return encode_coco_rle(mask_from_tensor(mask, "encode_coco_rle")); },
        py::arg("mask"), "[H, W] mask -> COCO's compressed RLE counts string.");
  m.def("letterbox_polygons",
        [](const PolygonList& polygons, const std::array<double, 4>& info) {
          LetterboxInfo li;
          li.scale_x = info[0], li.scale_y = info[1], li.pad_x = int64_t(info[2]), li.pad_y = int64_t(info[3]);
          return from_polygons(letterbox_polygons(to_polygons(polygons, "letterbox_polygons"), li));
        },
        py::arg("polygons"), py::arg("info"), "Polygons moved as letterbox(...) moved the pixels (info: its third result).");
  m.def("flip_polygons",
        [](const PolygonList& polygons, int64_t width) {
          return from_polygons(flip_polygons(to_polygons(polygons, "flip_polygons"), width));
        },
        py::arg("polygons"), py::arg("width"));
  m.def("scale_polygons",
        [](const PolygonList& polygons, double scale_x, double scale_y) {
          return from_polygons(scale_polygons(to_polygons(polygons, "scale_polygons"), scale_x, scale_y));
        },
        py::arg("polygons"), py::arg("scale_x"), py::arg("scale_y"));
  m.def("crop_polygons",
        [](const PolygonList& polygons, double x, double y, double w, double h, double scale_x, double scale_y) {
          return from_polygons(crop_polygons(to_polygons(polygons, "crop_polygons"), x, y, w, h, scale_x, scale_y));
        },
        py::arg("polygons"), py::arg("x"), py::arg("y"), py::arg("width"), py::arg("height"), py::arg("scale_x") = 1.0,
        py::arg("scale_y") = 1.0, "Clipped to the rectangle, moved to its origin and scaled; [] for one cut off.");
  m.def("draw_masks",
        [](const torch::Tensor& img, const PolygonList& polygons, const std::vector<std::string>& labels, double alpha) {
          return image_to_tensor(draw_masks(image_from_tensor(img), to_polygons(polygons, "draw_masks"), labels, alpha));
        },
        py::arg("image"), py::arg("polygons"), py::arg("labels") = std::vector<std::string>{}, py::arg("alpha") = 0.45);
  m.def("segmentation_answer",
        [](const std::vector<std::string>& labels, const PolygonList& polygons, int64_t width, int64_t height,
           int64_t max_vertices) {
          return segmentation_answer_of(labels, to_polygons(polygons, "segmentation_answer"), width, height,
                                        max_vertices);
        },
        py::arg("labels"), py::arg("polygons"), py::arg("width"), py::arg("height"),
        py::arg("max_vertices") = kDefaultMaxVertices,
        "The segmentation JSON {\"Object\": labels, \"Polygon\": outlines on the 0..999 grid}, each outline "
        "simplified to at most max_vertices.");
  m.def("save_png", [](const torch::Tensor& img, const std::string& path) { save_png(image_from_tensor(img), path); },
        py::arg("image"), py::arg("path"));
  m.def("save_grid",
        [](const std::vector<torch::Tensor>& images, const std::vector<std::string>& texts, const std::string& path,
           int64_t columns) {
          std::vector<cv::Mat> mats;
          for (const auto& t : images) mats.push_back(image_from_tensor(t));
          return image_to_tensor(save_grid(mats, texts, path, columns));
        },
        py::arg("images"), py::arg("texts"), py::arg("path"), py::arg("columns") = 4);

  auto policy = [](const std::string& name) {
    TORCH_CHECK_VALUE(name == "raise" || name == "skip", "bad_samples must be 'raise' or 'skip', got '", name, "'");
    return from_name<BadSamplePolicy>(name);
  };
  auto read = [policy](const std::string& format, const std::string& path, const std::string& image_root,
                       const std::string& bad_samples, ReadReport* report) {
    const auto p = policy(bad_samples);
    if (format == "jsonl") return read_jsonl_manifest(path, p, report, image_root);
    if (format == "llava") return read_llava_json(path, image_root, p, report);
    if (format == "coco_captions") return read_coco_captions(path, image_root, p, report);
    if (format == "coco_instances") return read_coco_instances(path, image_root, p, report);
    if (format == "coco_segmentation") return read_coco_instances(path, image_root, p, report, CocoTask::segment);
    TORCH_CHECK_VALUE(false, "unknown dataset format '", format,
                      "'; expected one of 'jsonl', 'llava', 'coco_captions', 'coco_instances', 'coco_segmentation'");
  };
  m.def("read_records",
        [read](const std::string& format, const std::string& path, const std::string& image_root,
               const std::string& bad_samples) {
          ReadReport report;
          auto records = read(format, path, image_root, bad_samples, &report);
          py::list out;
          for (const auto& r : records) {
            py::list turns;
            for (const auto& t : r.turns) turns.append(py::make_tuple(t.role, t.text));
            py::dict d;
            d["image"] = r.image;
            d["turns"] = turns;
            d["boxes"] = from_boxes(r.boxes);
            d["labels"] = r.labels;
            d["polygons"] = from_polygons(r.polygons);
            d["line"] = r.source_line;
            out.append(d);
          }
          py::dict rep;
          rep["read"] = report.read;
          rep["skipped"] = report.skipped;
          rep["problems"] = report.problems;
          return py::make_tuple(out, rep);
        },
        py::arg("format"), py::arg("path"), py::arg("image_root") = "", py::arg("bad_samples") = "raise");
  m.def("encode_conversation",
        [](const std::vector<std::pair<std::string, std::string>>& turns) {
          std::vector<Turn> t;
          for (const auto& [role, text] : turns) t.push_back({role, text});
          auto e = encode_conversation(t);
          py::dict d;
          d["input_ids"] = e.input_ids;
          d["labels"] = e.labels;
          d["image_positions"] = e.image_positions;
          return d;
        },
        py::arg("turns"));

  py::class_<Loader, BatchSource>(m, "Loader", "Threaded loader over a dataset file (see vlmkit.data.Loader).")
      .def(py::init([read](const std::string& format, const std::string& path, const std::string& image_root,
                           const py::kwargs& kwargs) {
             LoaderOptions o;
             read_options(to_json(kwargs), "Loader", o, {});
             ReadReport report;
             auto records = read(format, path, image_root, to_name(o.bad_samples()), &report);
             return std::make_unique<Loader>(std::move(records), o);
           }),
           py::arg("format"), py::arg("path"), py::arg("image_root") = "")
      .def_property_readonly_static("defaults", [](py::object) { return to_python(options_to_json(LoaderOptions())); },
                                    "Every option with its default, by name (vlmkit.data.Loader's keywords).")
      .def("__len__", &Loader::num_batches)
      .def_property_readonly("num_records", &Loader::size)
      .def_property_readonly("skipped", &Loader::skipped)
      .def("epoch_order", &Loader::epoch_order, py::arg("epoch"))
      .def("start_epoch", &Loader::start_epoch, py::arg("epoch"), py::arg("first_batch") = 0, py::call_guard<py::gil_scoped_release>())
      .def("next_batch", [](Loader& self) -> py::object {
        std::optional<Batch> batch;
        {
          py::gil_scoped_release release;
          batch = self.next();
        }
        if (!batch) return py::none();
        return batch_to_dict(*batch);
      });

  py::class_<SentencePieceTokenizer>(m, "SentencePieceTokenizer",
                                     "SentencePiece with vlmkit's special ids (0 <pad>, 1 <bos>, 2 <eos>, 3 <image>).")
      .def(py::init<const std::string&>(), py::arg("model_path"))
      .def_static("train", &SentencePieceTokenizer::train, py::arg("text_file"), py::arg("model_prefix"),
                  py::arg("vocab_size"), py::arg("model_type") = "bpe", py::call_guard<py::gil_scoped_release>())
      .def("encode", &SentencePieceTokenizer::encode, py::arg("text"), py::arg("add_bos") = true,
           py::arg("add_eos") = false)
      .def("decode", &SentencePieceTokenizer::decode, py::arg("ids"), py::arg("skip_special") = true)
      .def("token_text", &SentencePieceTokenizer::token_text, py::arg("id"))
      .def("save", &SentencePieceTokenizer::save, py::arg("path"))
      .def_property_readonly("vocab_size", &SentencePieceTokenizer::vocab_size)
      .def_property_readonly("pad_id", [](const SentencePieceTokenizer& t) { return t.special().pad; })
      .def_property_readonly("bos_id", [](const SentencePieceTokenizer& t) { return t.special().bos; })
      .def_property_readonly("eos_id", [](const SentencePieceTokenizer& t) { return t.special().eos; })
      .def_property_readonly("image_id", [](const SentencePieceTokenizer& t) { return t.special().image; });

  py::class_<SyntheticDataset>(m, "SyntheticDataset",
                               "Deterministic multitask scenes: sample i depends only on (seed, i).")
      .def(py::init([](int64_t size, int64_t image_size, int64_t min_shapes, int64_t max_shapes,
                       double word_probability, uint64_t seed) {
             SyntheticOptions o;
             o.image_size = image_size;
             o.min_shapes = min_shapes;
             o.max_shapes = max_shapes;
             o.word_probability = word_probability;
             o.seed = seed;
             return SyntheticDataset(size, o);
           }),
           py::arg("size"), py::arg("image_size") = 64, py::arg("min_shapes") = 1, py::arg("max_shapes") = 3,
           py::arg("word_probability") = 0.5, py::arg("seed") = 0)
      .def("__len__", &SyntheticDataset::size)
      .def("__getitem__",
           [](const SyntheticDataset& self, int64_t index) {
             if (index < 0) index += self.size();
             SyntheticSample sample;
             {
               py::gil_scoped_release release;
               sample = self.get(index);
             }
             auto entry = self.manifest_entry(sample, "");
             py::dict out = to_python(json::parse(entry.dump()));
             out.attr("pop")("image");
             out["image"] = image_to_tensor(sample.image);
             const int64_t s = sample.image.rows;
             auto masks = torch::zeros({int64_t(sample.objects.size()), s, s}, torch::kUInt8);
             for (size_t i = 0; i < sample.objects.size(); ++i) masks[int64_t(i)].copy_(mask_to_tensor(sample.objects[i].mask));
             out["masks"] = masks;
             return out;
           },
           py::arg("index"))
      .def("write", &SyntheticDataset::write, py::arg("directory"), py::call_guard<py::gil_scoped_release>(),
           "Writes images/NNNNNN.png and manifest.jsonl under directory.")
      .def_property_readonly_static("colours", [](py::object) { return SyntheticDataset::colours(); })
      .def_property_readonly_static("shapes", [](py::object) { return SyntheticDataset::shapes(); })
      .def_property_readonly_static("words", [](py::object) { return SyntheticDataset::words(); })
      .def_static("colour_rgb", [](const std::string& name) {
        auto c = SyntheticDataset::colour_rgb(name);
        return std::vector<int>{c[0], c[1], c[2]};
      });
}

}  // namespace vlmkit::bindings
