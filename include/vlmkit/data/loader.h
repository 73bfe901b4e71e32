#pragma once
/// A threaded loader: worker threads decode and transform records outside the
/// GIL into batches, a bounded window of batches is prefetched, and the order
/// is a per-epoch permutation of (seed, epoch) — the same whatever the number
/// of threads.
#include <torch/arg.h>
#include <torch/types.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "vlmkit/data/batch.h"
#include "vlmkit/data/datasets.h"
#include "vlmkit/data/image.h"

namespace vlmkit {

struct LoaderOptions {
  TORCH_ARG(int64_t, batch_size) = 8;
  TORCH_ARG(int64_t, num_workers) = 2;
  /// Batches decoded ahead of the consumer (the bounded queue).
  TORCH_ARG(int64_t, prefetch) = 4;
  TORCH_ARG(bool, shuffle) = true;
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(bool, drop_last) = false;
  TORCH_ARG(BadSamplePolicy, bad_samples) = BadSamplePolicy::raise;
  TORCH_ARG(int64_t, image_size) = 64;
  /// "square", "letterbox", "center_crop" (image_size x image_size) or
  /// "dynamic" (Qwen2-VL: each image keeps its aspect, sides rounded to
  /// multiples of patch_size * merge_size within [dynamic_min_pixels,
  /// dynamic_max_pixels]; a batch is zero-padded to its largest image and
  /// Batch::image_sizes tells the model which patches are real).
  ///
  /// "tiles" (nanoVLM / Idefics3): a global view plus up to max_tiles
  /// image_size x image_size crops of the image resized to the grid that best
  /// keeps its aspect; each becomes an image of the batch and the prompt gets
  /// one <image> placeholder per view (Batch::images_per_sample says how
  /// many). Needs concat fusion (several images per sample).
  TORCH_ARG(std::string, resize) = "square";
  TORCH_ARG(int64_t, max_tiles) = 4;
  TORCH_ARG(bool, global_view) = true;
  TORCH_ARG(int64_t, patch_size) = 8;
  TORCH_ARG(int64_t, merge_size) = 2;
  /// 0: (patch_size * merge_size)^2, one merged token.
  TORCH_ARG(int64_t, dynamic_min_pixels) = 0;
  /// 0: image_size^2, the pixel budget of the square modes.
  TORCH_ARG(int64_t, dynamic_max_pixels) = 0;
  /// Normalisation preset: "clip", "siglip", "imagenet", "none".
  TORCH_ARG(std::string, normalize) = "clip";
  TORCH_ARG(int64_t, max_pixels) = kDefaultMaxPixels;
  /// Decode JPEGs that will shrink 2x or more at 1/2, 1/4 or 1/8 scale
  /// (libjpeg's DCT scaling, like PIL's Image.draft): faster, pixels a little
  /// different from a full decode + resize. false: the same bytes as PIL +
  /// torchvision's Resize (bilinear) on the full image.
  TORCH_ARG(bool, jpeg_draft) = true;
  /// Training augmentation, seeded by (seed, epoch, record): horizontal flips
  /// with this probability and random resized crops down to this area
  /// fraction (1 = off) only for records without fixed geometry (text-aware:
  /// no flips for answers that read text or say left/right); colour jitter of
  /// this strength (0 = off) for all.
  TORCH_ARG(double, flip_probability) = 0.0;
  TORCH_ARG(double, crop_scale) = 1.0;
  TORCH_ARG(double, color_jitter) = 0.0;
  /// Data-parallel sharding: each global batch of batch_size * world_size
  /// records (one permutation shared by every rank) is split into world_size
  /// consecutive slices and this loader yields slice `rank`.
  TORCH_ARG(int64_t, rank) = 0;
  TORCH_ARG(int64_t, world_size) = 1;
  /// Sequence packing (0 = off): each batch's batch_size examples are packed
  /// first-fit-decreasing into rows of at most pack_to decoder positions
  /// (Batch::segment_ids says which example each token belongs to); an
  /// example longer than that gets a row of its own. Every <image>
  /// placeholder counts pack_image_tokens positions (the model's image tokens
  /// per image with concat fusion, 1 with cross-attention).
  TORCH_ARG(int64_t, pack_to) = 0;
  TORCH_ARG(int64_t, pack_image_tokens) = 1;
  /// Length-grouped batching, the simpler option: each window of 32 batches
  /// of the epoch's order is sorted by token count and cut into batches, whose
  /// order within the window is shuffled; rows of a batch have similar lengths.
  TORCH_ARG(bool, group_by_length) = false;
};

/// The options' fields: the one list that the binding's keyword parsing and
/// vlmkit.data.Loader's signature read.
template <class V>
void visit_fields(LoaderOptions& o, V& v) {
  v("batch_size", o.batch_size());
  v("num_workers", o.num_workers());
  v("prefetch", o.prefetch());
  v("shuffle", o.shuffle());
  v("seed", o.seed());
  v("drop_last", o.drop_last());
  v("bad_samples", o.bad_samples());
  v("image_size", o.image_size());
  v("resize", o.resize());
  v("max_tiles", o.max_tiles());
  v("global_view", o.global_view());
  v("patch_size", o.patch_size());
  v("merge_size", o.merge_size());
  v("dynamic_min_pixels", o.dynamic_min_pixels());
  v("dynamic_max_pixels", o.dynamic_max_pixels());
  v("normalize", o.normalize());
  v("max_pixels", o.max_pixels());
  v("jpeg_draft", o.jpeg_draft());
  v("flip_probability", o.flip_probability());
  v("crop_scale", o.crop_scale());
  v("color_jitter", o.color_jitter());
  v("rank", o.rank());
  v("world_size", o.world_size());
  v("pack_to", o.pack_to());
  v("pack_image_tokens", o.pack_image_tokens());
  v("group_by_length", o.group_by_length());
}

class Loader : public BatchSource {
 public:
  Loader(std::vector<Record> records, LoaderOptions options = {});
  ~Loader() override;
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  int64_t size() const { return int64_t(records_.size()); }
  int64_t num_batches() const override;
  /// The record order of an epoch.
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  /// Starts (or restarts) an epoch at batch `first_batch`: workers begin
  /// decoding its batches.
  void start_epoch(int64_t epoch, int64_t first_batch = 0) override;
  /// The next batch of the epoch, blocking; nullopt once the epoch is done.
  /// A bad sample under the raise policy rethrows its ValueError here.
  std::optional<Batch> next() override;
  /// Samples skipped so far under the skip policy.
  int64_t skipped() const { return skipped_.load(); }
  const LoaderOptions& options() const { return options_; }


 private:
  void stop();
  void work();
  /// Decoded, resized and augmented images (uint8 RGB; several in "tiles"
  /// mode) and the encoded text.
  struct Prepared {
    std::vector<cv::Mat> images;
    EncodedConversation text;
  };
  Prepared prepare(int64_t index, int64_t epoch) const;
  Batch collate(const std::vector<int64_t>& indices, std::vector<Prepared>& items) const;
  /// Rows of a batch: item numbers per row (one each unless packing).
  std::vector<std::vector<size_t>> pack_rows(const std::vector<Prepared>& items) const;

  std::vector<Record> records_;
  std::vector<int64_t> lengths_;  // token count per record (group_by_length only)
  LoaderOptions options_;
  ByteTokenizer tokenizer_;
  Normalization norm_;

  std::vector<int64_t> order_;
  int64_t epoch_ = 0;
  int64_t batches_ = 0;
  int64_t next_to_claim_ = 0;
  int64_t next_to_yield_ = 0;
  bool stopping_ = false;
  std::map<int64_t, std::optional<Batch>> ready_;  // nullopt: every sample of the batch was skipped
  std::map<int64_t, std::exception_ptr> errors_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<int64_t> skipped_{0};
};

}  // namespace vlmkit
