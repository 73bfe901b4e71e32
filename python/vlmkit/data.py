"""The image pipeline (OpenCV, in C++): decode from any source, resize, normalise,
augment with boxes, draw. Images are [H, W, 3] uint8 RGB tensors; boxes are lists
of [x1, y1, x2, y2] pixel coordinates.

    image = vlmkit.data.load_image("photo.jpg")            # or bytes, a data URL, numpy, a tensor
    pixels, boxes = vlmkit.data.preprocess(image, size=224, mode="letterbox", boxes=[[10, 20, 50, 80]])
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _C

if not _C.with_opencv:  # pragma: no cover - builds without the OpenCV component
    raise ImportError("vlmkit was built without its OpenCV image pipeline (VLMKIT_WITH_OPENCV=OFF)")

DEFAULT_MAX_PIXELS: int = _C.DEFAULT_MAX_PIXELS
Boxes = List[List[float]]
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, torch.Tensor, "numpy.ndarray"]

dynamic_resolution = _C.dynamic_resolution
peek_image_size = _C.peek_image_size


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decodes any image source to an [H, W, 3] uint8 RGB tensor.

    Sources: a path (str or PathLike), a data URL (``data:image/jpeg;base64,...``),
    encoded bytes, a numpy HxW or HxWxC uint8 array, or a tensor ([H, W, C] uint8 or
    [C, H, W] float in [0, 1]). Grayscale, alpha (composited over white), 16-bit and
    palette images become RGB; JPEG EXIF orientation is applied. Missing files raise
    FileNotFoundError; corrupt, truncated, empty or oversized (``max_pixels``) inputs
    raise ValueError; unsupported source types raise TypeError.
    """
    if isinstance(source, str) and source.startswith("data:"):
        return _C.decode_data_url(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _C.load_image_file(os.fspath(source), max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _C.decode_image_bytes(bytes(source), max_pixels)
    if isinstance(source, torch.Tensor):
        return _C.image_from_tensor(_as_hwc(source))
    if type(source).__module__ == "numpy" and hasattr(source, "dtype"):
        import numpy as np

        array = np.ascontiguousarray(source)
        if array.dtype != np.uint8:
            raise TypeError(f"expected a uint8 numpy image, got dtype {array.dtype}")
        return _C.image_from_tensor(_as_hwc(torch.from_numpy(array)))
    raise TypeError(f"expected a path, data URL, bytes, numpy array or tensor, got {type(source).__name__}")


def _as_hwc(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2 and t.dtype == torch.uint8:
        return t.unsqueeze(-1)
    return t


def preprocess(image: ImageSource, size: int = 224, mode: str = "square", normalize: str = "clip",
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
               boxes: Optional[Boxes] = None, patch_size: int = 14, merge_size: int = 2,
               min_pixels: Optional[int] = None, max_pixels: Optional[int] = None) -> Tuple[torch.Tensor, Boxes]:
    """Resizes (``mode``: "square", "letterbox" (maps boxes), "center_crop": shortest
    side then a central crop) and normalises (preset "clip", "siglip", "imagenet",
    "none", or explicit ``mean``/``std``) to a [3, size, size] float tensor.

    ``mode="dynamic"`` (Qwen2-VL): the aspect is kept and both sides are rounded to
    multiples of ``patch_size * merge_size`` with the pixel count in [``min_pixels``
    (default one merged patch), ``max_pixels`` (default size * size)], so the tensor
    is [3, h, w] and the number of image tokens follows the image. Batch such
    tensors with ``collate_images``. Boxes are scaled with the image."""
    image = load_image(image) if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8
                                      and image.dim() == 3 and image.shape[-1] == 3) else image
    out_boxes = [list(b) for b in boxes] if boxes else []
    if mode == "square":
        h, w = image.shape[:2]
        image = _C.resize_square(image, size)
        out_boxes = [[b[0] * size / w, b[1] * size / h, b[2] * size / w, b[3] * size / h] for b in out_boxes]
    elif mode == "letterbox":
        image, out_boxes, _ = _C.letterbox(image, size, out_boxes)
    elif mode == "dynamic":
        h, w = image.shape[:2]
        factor = patch_size * merge_size
        nh, nw = _C.dynamic_resolution(h, w, patch_size, merge_size,
                                       min_pixels if min_pixels is not None else factor * factor,
                                       max_pixels if max_pixels is not None else max(size * size, factor * factor))
        image = _C.resize_image(image, nh, nw)
        out_boxes = [[b[0] * nw / w, b[1] * nh / h, b[2] * nw / w, b[3] * nh / h] for b in out_boxes]
    elif mode == "center_crop":
        if out_boxes:
            raise ValueError("mode 'center_crop' drops image borders; use 'letterbox' or 'square' with boxes")
        image = _C.shortest_side_center_crop(image, size)
    else:
        raise ValueError(f"unknown resize mode {mode!r}; expected 'square', 'letterbox', 'center_crop' or 'dynamic'")
    preset_mean, preset_std = _C.normalization_preset(normalize)
    pixels = _C.to_chw(image, list(mean) if mean is not None else preset_mean,
                       list(std) if std is not None else preset_std)
    return pixels, out_boxes


def collate_images(images: Sequence[torch.Tensor], multiple: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batches [C, h, w] images of different sizes: returns ``images`` [B, C, H, W]
    (each top-left, zeros elsewhere; H and W the largest sides rounded up to
    ``multiple``) and ``image_sizes`` [B, 2] int64 (height, width). Pass both to the
    model (``model(images, ids, image_sizes=sizes)``): the ViT masks the padded
    patches and concat fusion packs only each image's own tokens."""
    return _C.collate_images(list(images), multiple)


def patch_padding_mask(image_sizes: torch.Tensor, height: int, width: int, patch: int = 1) -> torch.Tensor:
    """[B, height / patch, width / patch] bool, True where a patch of the padded batch
    lies outside its image (``image_sizes`` from ``collate_images`` or the Loader): the
    mask a model of your own needs to ignore the padding. vlmkit's models derive it."""
    return _C.patch_padding_mask(image_sizes, height, width, patch)


letterbox = _C.letterbox
resize_image = _C.resize_image
resize_square = _C.resize_square
shortest_side_center_crop = _C.shortest_side_center_crop
tile_image = _C.tile_image
horizontal_flip = _C.horizontal_flip
random_resized_crop = _C.random_resized_crop
color_jitter = _C.color_jitter
# Masks and outlines (docs/data.md, "Segmentation"): polygons are flat pixel lists
# [x1, y1, x2, y2, ...] as in COCO; masks [H, W] uint8 tensors (1 inside).
mask_to_polygons = _C.mask_to_polygons
mask_to_polygon = _C.mask_to_polygon
polygon_to_mask = _C.polygon_to_mask
simplify_polygon = _C.simplify_polygon
decode_coco_rle = _C.decode_coco_rle
encode_coco_rle = _C.encode_coco_rle
letterbox_polygons = _C.letterbox_polygons
flip_polygons = _C.flip_polygons
scale_polygons = _C.scale_polygons
crop_polygons = _C.crop_polygons
segmentation_answer = _C.segmentation_answer
save_png = _C.save_png
save_grid = _C.save_grid
SyntheticDataset = _C.SyntheticDataset
SentencePieceTokenizer = _C.SentencePieceTokenizer
ByteTokenizer = _C.ByteTokenizer
encode_conversation = _C.encode_conversation


def chat_prompt(question: str) -> str:
    """The prompt text of the template for generation ("User: {question}\nAssistant: "):
    encoded with <bos>, it equals the prefix that encode_conversation trains on."""
    return f"User: {question}\nAssistant: "
FORMATS = ("jsonl", "llava", "coco_captions", "coco_instances", "coco_segmentation")


def read_records(path, format: str = "jsonl", image_root=None, bad_samples: str = "raise"):
    """Reads a dataset file into records (image, turns, boxes, labels, line) and a
    report {"read", "skipped", "problems"}. Malformed entries raise ValueError with
    the file and line, or with ``bad_samples="skip"`` are skipped and counted."""
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.fspath(path)) or "."
    return _C.read_records(format, os.fspath(path), root, bad_samples)


class Loader:
    """Batches of a dataset file, decoded on C++ worker threads outside the GIL.

    Each batch is a dict: ``images`` [B, 3, S, S] float (normalised), ``image_sizes``
    [B, 2] (height, width of each image), ``images_per_sample`` [B], ``input_ids``,
    ``labels`` (answer tokens, -100 elsewhere) and ``padding_mask`` [B, T] from the
    prompt template, and ``indices`` [B]. The order is a permutation of (seed,
    epoch), the same for any ``num_workers``; ``prefetch`` bounds the batches in
    flight. ``bad_samples="skip"`` drops unreadable samples and counts them
    (``loader.skipped``); "raise" raises their ValueError. Augmentation (seeded by
    seed, epoch and record): ``flip_probability``, ``crop_scale`` (random resized crop
    down to that area fraction) and ``color_jitter``; flips and crops skip records whose
    answer depends on geometry or reads text (boxes, "left"/"right", OCR).
    Data parallel: ``rank`` / ``world_size`` split every global batch of
    ``batch_size * world_size`` records (one order shared by all ranks) into slices.

    ``resize="dynamic"`` (Qwen2-VL-style dynamic resolution): each image keeps its
    aspect with sides multiples of ``patch_size * merge_size`` and at most
    ``dynamic_max_pixels`` (default ``image_size ** 2``) pixels; a batch is padded
    to its largest image and ``image_sizes`` tells the model which patches are real
    (pass ``image_sizes=batch["image_sizes"]`` to the model; the Trainer does).

    ``resize="tiles"`` (nanoVLM / Idefics3): a global view plus up to ``max_tiles``
    ``image_size`` crops of the image on the grid that best keeps its aspect; every
    view is an image of the batch (``images`` [I, 3, S, S]), the prompt gets one
    ``<image>`` per view, and ``images_per_sample`` [B] counts them. Use concat fusion.

    ``jpeg_draft`` (default True): JPEGs that shrink 2x or more decode at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling), several times cheaper; False gives exactly the
    pixels of PIL + torchvision's bilinear ``Resize`` (every resize here is PIL's
    anti-aliased bilinear, byte for byte).

    ``pack_to=N`` (sequence packing): the ``batch_size`` examples of each batch are
    packed first-fit-decreasing into rows of at most N decoder positions, each
    ``<image>`` counting ``pack_image_tokens`` (the model's image tokens with concat
    fusion, 1 with cross-attention); ``segment_ids`` [rows, T] says which example of
    its row each token belongs to (-1 at padding), ``indices`` lists the examples in
    row order and ``images_per_sample`` counts each row's images. Pass
    ``segment_ids=batch["segment_ids"]`` to the model (the Trainer does): loss and
    gradients equal those of the unpacked batch. ``group_by_length`` is the simpler
    option: windows of 32 batches are sorted by length before batching.
    """

    def __init__(self, path, format: str = "jsonl", image_root=None, **options: Any) -> None:
        # The options are C++'s LoaderOptions (one field list: _C.Loader.defaults); the
        # signature below is generated from it.
        unknown = sorted(set(options) - set(_LOADER_OPTIONS))
        if unknown:
            raise TypeError(f"Loader: unexpected option(s) {', '.join(map(repr, unknown))}; the options are "
                            f"{', '.join(_LOADER_OPTIONS)}")
        root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.fspath(path)) or "."
        self._loader = _C.Loader(format, os.fspath(path), root, **options)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def skipped(self) -> int:
        return self._loader.skipped

    def epoch_order(self, epoch: int) -> List[int]:
        return self._loader.epoch_order(epoch)

    def __iter__(self):
        self._loader.start_epoch(self.epoch)
        self.epoch += 1
        while True:
            batch = self._loader.next_batch()
            if batch is None:
                return
            yield batch



#: Every Loader option with its default, from C++ (LoaderOptions' field list).
_LOADER_OPTIONS: Dict[str, Any] = _C.Loader.defaults


def _loader_signature() -> "inspect.Signature":
    import inspect
    plain = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", plain), inspect.Parameter("path", plain),
              inspect.Parameter("format", plain, default="jsonl"), inspect.Parameter("image_root", plain, default=None)]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in _LOADER_OPTIONS.items()]
    return inspect.Signature(params)


Loader.__init__.__signature__ = _loader_signature()
Loader.__doc__ += ("\n    Options and defaults (C++ LoaderOptions): "
                   + ", ".join(f"{k}={v!r}" for k, v in _LOADER_OPTIONS.items()) + ".\n")

def plot_bounding_boxes(image: ImageSource, boxes: Boxes, labels: Sequence[str] = (),
                        path: Optional[str] = None) -> torch.Tensor:
    """Draws pixel boxes and labels on the image; writes a PNG when ``path`` is given."""
    drawn = _C.draw_boxes(load_image(image) if not isinstance(image, torch.Tensor) else _C.image_from_tensor(image),
                          [list(map(float, b)) for b in boxes], list(labels))
    if path is not None:
        _C.save_png(drawn, os.fspath(path))
    return drawn


def plot_masks(image: ImageSource, polygons: Sequence[Sequence[float]], labels: Sequence[str] = (),
               path: Optional[str] = None, alpha: float = 0.45) -> torch.Tensor:
    """Fills each polygon (flat pixel list [x1, y1, x2, y2, ...]) in a translucent
    colour, outlines and labels it; writes a PNG when ``path`` is given. A mask
    ([H, W] tensor) in place of a polygon is traced first; an empty polygon (an
    object cut off) is left out with its label."""
    if labels and len(labels) != len(polygons):
        raise ValueError(f"plot_masks: {len(polygons)} polygons but {len(labels)} labels (one each, or none)")
    picture = load_image(image) if not isinstance(image, torch.Tensor) else _C.image_from_tensor(image)
    flat = []
    for p in polygons:
        if isinstance(p, torch.Tensor) and p.dim() == 2:
            parts = _C.mask_to_polygons(p, 1000)
            flat.append(parts[0] if parts else [])
        else:
            flat.append([float(v) for v in p])
    keep = [i for i, p in enumerate(flat) if len(p)]
    drawn = _C.draw_masks(picture, [flat[i] for i in keep], [labels[i] for i in keep] if labels else [], alpha)
    if path is not None:
        _C.save_png(drawn, os.fspath(path))
    return drawn
