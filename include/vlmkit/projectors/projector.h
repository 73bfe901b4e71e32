#pragma once
/// The projector slot (connector): image-encoder tokens -> decoder-width tokens.
///
/// Each implementation has its own header beside this one (mlp.h, ...) and
/// registers a row in projector_registry() from its source file; configs name
/// it by the row's name ({"projector": {"type": name, ...fields}}), and Python
/// exposes it as vlmkit.<row.python_class>. `vlmkit.projector_types()` (or
/// projector_registry().rows() in C++) lists them with their fields.
#include <torch/arg.h>
#include <torch/nn/module.h>

#include <array>
#include <memory>
#include <ostream>
#include <string>

#include "vlmkit/modules/encoder.h"
#include "vlmkit/registry.h"

namespace vlmkit {

/// The projector slot contract.
class ProjectorModule : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  /// image.tokens [B, N, in_dim] (with image.grid) -> [B, M, out_dim].
  virtual torch::Tensor forward(const EncoderOutput& image) = 0;
  /// M for an input of N tokens on a rows x cols grid.
  virtual int64_t num_output_tokens(int64_t rows, int64_t cols) const = 0;
  /// The (rows, cols) grid the output tokens lie on, row-major, for an input
  /// grid of rows x cols; {0, 0} when they lie on none (learned queries). The
  /// default (per-token projectors) keeps the input grid.
  virtual std::array<int64_t, 2> output_grid(int64_t rows, int64_t cols) const { return {rows, cols}; }
  /// [B, M] bool (true = padding) for the output tokens, given the input's
  /// padding_mask (variable-size images); undefined when nothing is padded.
  /// The default (per-token projectors) passes the input mask through.
  virtual torch::Tensor output_padding_mask(const EncoderOutput& image) const { return image.padding_mask; }
  virtual int64_t input_dim() const = 0;
  virtual int64_t output_dim() const = 0;
  /// {"type": name, ...the fields the row's config reads}.
  virtual nlohmann::json config() const = 0;
  /// name(in_dim=..., out_dim=..., <config fields>), shared by all projectors.
  void pretty_print(std::ostream& stream) const override;
};

/// Helpers for implementations.
namespace detail {
/// Raises ValueError unless in_dim and out_dim are positive.
void check_projector_dims(int64_t in_dim, int64_t out_dim, const char* who);
/// Raises ValueError unless image.tokens is [B, N, in_dim].
void check_image_tokens(const EncoderOutput& image, int64_t in_dim, const char* who);
/// Grid of the tokens: the encoder's, or a square one when it reports none.
std::array<int64_t, 2> token_grid(const EncoderOutput& image, const char* who);
/// Space-to-depth on a token grid: each r x r block of tokens [B, rows*cols, D]
/// becomes one token of r*r*D features, row-major: [B, (rows/r)*(cols/r), r*r*D].
torch::Tensor space_to_depth(const torch::Tensor& tokens, std::array<int64_t, 2> grid, int64_t r, const char* who);
/// Padding mask [B, rows*cols] -> [B, (rows/r)*(cols/r)]: a block is padding
/// only when all its tokens are (undefined in, undefined out).
torch::Tensor merge_padding_mask(const EncoderOutput& image, int64_t r, const char* who);
}  // namespace detail

/// The widths every projector's options start with; the architecture sets
/// them (encoder width in, decoder or memory width out), so configs do not
/// carry them. Options structs derive from it.
struct ProjectorDims {
  ProjectorDims(int64_t in_dim, int64_t out_dim) : in_dim_(in_dim), out_dim_(out_dim) {}
  TORCH_ARG(int64_t, in_dim);
  TORCH_ARG(int64_t, out_dim);
};

/// The shared part of a projector class `Impl` with options `Opts` (derived
/// from ProjectorDims): the options, the width checks, input_dim, output_dim
/// and config(). `Impl` declares `static constexpr const char* kName`.
template <class Impl, class Opts>
class ProjectorBase : public ProjectorModule {
 public:
  using Options = Opts;
  ProjectorBase(const char* module_name, Options options_)
      : ProjectorModule(module_name), options(std::move(options_)) {
    detail::check_projector_dims(options.in_dim(), options.out_dim(), module_name);
  }
  int64_t input_dim() const override { return options.in_dim(); }
  int64_t output_dim() const override { return options.out_dim(); }
  nlohmann::json config() const override { return slot_config(static_cast<const Impl&>(*this)); }

  Options options;
};

/// Rows build a projector from (config, path, in_dim, out_dim): the widths
/// come from the architecture (encoder width, decoder or memory width).
using ProjectorRegistry = SlotRegistry<ProjectorModule, int64_t, int64_t>;
ProjectorRegistry& projector_registry();

/// Builds the projector named by config["type"] (default "mlp"); null config
/// gives that projector with its defaults. Unknown names and keys raise
/// ValueError listing the allowed ones.
std::shared_ptr<ProjectorModule> make_projector(const json& config, int64_t in_dim, int64_t out_dim,
                                                const std::string& path = "projector");

/// Registers `Impl` (see slot_row in registry.h) from its source file, at
/// namespace scope.
#define VLMKIT_REGISTER_PROJECTOR(Impl, python_class, doc) \
  VLMKIT_REGISTER(::vlmkit::projector_registry(),         \
                  (::vlmkit::slot_row<Impl, ::vlmkit::ProjectorModule>(python_class, doc, int64_t{1}, int64_t{1})))

}  // namespace vlmkit
