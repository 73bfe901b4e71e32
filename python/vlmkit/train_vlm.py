"""Training the small encoder-decoder VLM on the synthetic multitask data — what
`vlmkit train` runs by default: stage 1 trains the image encoder on the scenes'
tags, then the VLM stage trains projector and decoder, both through vlmkit.Trainer. Every scene of the
synthetic dataset yields captioning, VQA (colour, shape, count, spatial), OCR,
detection (JSON with 0..999 boxes), segmentation of one named object (JSON with a
0..999 polygon) and JSON-extraction examples."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Collection, Dict, List, Optional, Tuple

import torch

from . import data, lora
from .metrics import average_precision, bleu4, box_iou, char_error_rate, mask_iou, segmentation_scores
from .models import EncoderDecoder
from .trainer import Trainer

SMALL_VLM = {
    "architecture": "encoder_decoder",
    "image_encoder": {"type": "vit", "image_size": 64, "patch_size": 8, "d_model": 128, "depth": 3,
                      "num_heads": 4, "stem": "conv", "pool": "mean"},
    "projector": {"type": "pixel_shuffle", "factor": 2},
    # Every decoder layer cross-attends to the image tokens (Flamingo's way in, without
    # the gate). Against concat fusion with a prefix-LM (the default until 2026-12-05)
    # the decoder learns to find the object a question names far earlier: colour 0.755
    # -> 0.97 and shape 0.93 -> 0.99 on the validation split (docs/training.md,
    # "Cross-attention fusion").
    "fusion": "cross_attention",
    # The 2D sine-cosine table of the projector's 4 x 4 grid on the image tokens:
    # cross-attention reads them as a set, and one object token in seven had lost its
    # column. Detection IoU 0.238 -> 0.318 and 0.254 -> 0.361 on the validation split
    # at seeds 0 and 1, the box's horizontal error halved (docs/training.md, "Image
    # positions").
    "image_positions": "sincos2d",
    "attention": "causal",
    # (cross_attention_every is the fusion's default, 1: every layer.)
    # qk_norm: an RMSNorm of each head's queries and keys in every self- and
    # cross-attention (Qwen3, OLMo-2): the look-ups and the two-object comparison are
    # learnt in the stable phase instead of the decay. Test split, seeds 0 / 1: spatial
    # 0.949 -> 1.000 / 0.956 -> 1.000, segment IoU 0.520 -> 0.578 / 0.535 -> 0.561,
    # det mAP@0.5 0.742 -> 0.862 / 0.788 -> 0.842; 1.01-1.08x the step time with the
    # fused RMSNorm (docs/training.md, "QK-norm as the default").
    "decoder": {"d_model": 128, "depth": 4, "num_heads": 4, "max_len": 256, "qk_norm": True},
    # Each example weighs sqrt(its answer tokens) (InternVL 2.5's square averaging):
    # with the token mean the ~100-token JSON answers took 83% of the weight and the
    # questions were not learnt (docs/training.md, "Causes"); with one weight per
    # example each box digit got 1/100 of an example and the boxes were not learnt.
    # Against "sample" on the validation split, seeds 0 / 1: detection IoU 0.318 ->
    # 0.473 / 0.361 -> 0.433, captions 0.71 -> 0.855 / 0.705 -> 0.825, spatial 0.439 ->
    # 0.537 / 0.415 -> 0.740 (docs/training.md, "Square averaging").
    "loss_reduction": "sqrt",
}

PROMPTS = {"caption": "Describe the image.", "ocr": "What does the text say?",
           "detection": "Detect the shapes.", "extraction": "Extract the fields as JSON."}

# Constrained decoding of the JSON tasks: the output always parses. The matcher writes
# an object's properties in the schema's order, so each schema lists them in the order
# of the training answers (the synthetic data sorts keys; a test checks the two agree).
DETECTION_SCHEMA = {"type": "object", "properties": {
    "Bounding_box": {"type": "array", "maxItems": 4, "items": {"type": "array", "minItems": 4, "maxItems": 4,
                     "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
    "Object": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}}}
# One outline of at most SyntheticDataset's vertex bound (12) per object.
SEGMENTATION_SCHEMA = {"type": "object", "properties": {
    "Object": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    "Polygon": {"type": "array", "maxItems": 4, "items": {"type": "array", "minItems": 6, "maxItems": 24,
                "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}}
EXTRACTION_SCHEMA = {"type": "object", "properties": {k: {"type": "string", "maxLength": 80}
                                                      for k in ("Colour", "Description", "Shapes", "Text")}}


# Scene splits: training scenes use the run's seed; validation (progress during
# training, and where steps and learning rates are tuned) and test (the figures
# reported, never tuned on) use seeds of their own.
VALIDATION_SEED_OFFSET = 20_000
TEST_SEED_OFFSET = 10_000
VQA_KINDS = ("colour", "shape", "count", "spatial")


@dataclass
class VlmRun:
    train_scenes: int = 3000
    eval_scenes: int = 200
    val_scenes: int = 24
    eval_every: int = 300
    # 0: the precision's default (STEPS).
    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    # Two stages (docs/training.md, "Causes" and "Fixes"): stage 1 trains the image
    # encoder on the scenes' tags (colours, shapes, words, counts, coarse positions),
    # then the VLM stage trains projector and decoder with the encoder frozen; the
    # VLM's own gradient neither teaches the encoder shape nor keeps what stage 1
    # taught it.
    # 800 steps: chosen on the validation split at 1,300 VLM steps (OCR CER 0.80 -> 0.12,
    # no question worse; docs/training.md, "Stage 1 of 800 steps").
    pretrain_steps: int = 800
    pretrain_lr: float = 2e-3
    # "dense": the scene tags and, per encoder token, the class and box digits of the
    # object under it (dense_targets, DENSE_PRETRAIN_WEIGHTS); "tags": the tags alone.
    # Dense against tags on the validation split, seed 0: colour 0.945 -> 0.960, shape
    # 0.960 -> 0.975, detection IoU / mAP@0.5 0.447 / 0.348 -> 0.546 / 0.510, captions
    # 0.800 -> 0.865 (docs/training.md, "Dense stage 1").
    pretrain_objective: str = "dense"
    # Weight of the dense objective's width-rank head (per token, the width rank of the
    # object under it; 0: no such head; "tags" has none). Test split, seed 0:
    # extraction 0.885 -> 0.941, its "Colour" field (the widest object's colour) the one
    # that moves (docs/training.md, "Width ranks in stage 1").
    pretrain_rank_weight: float = 0.1
    # Components the VLM stage does not train.
    freeze: Tuple[str, ...] = ("image_encoder",)
    # Learning rate of the image encoder in the VLM stage when it is not frozen
    # (0: the run's lr).
    encoder_lr: float = 0.0
    weight_decay: float = 0.05
    warmup: int = 50
    # The share of the VLM stage's steps, at the end, over which the rate decays
    # (cosine to 0); before it the rate holds at lr (warmup-stable-decay). 1.0: cosine
    # over the whole stage, the default until the sixteenth session. 0.2 against 1.0 on
    # the validation split: segment IoU 0.511 -> 0.536 (seed 0) and 0.502 -> 0.570
    # (seed 1), detection mAP@0.5 0.729 -> 0.755 and 0.735 -> 0.796 (docs/training.md,
    # "Warmup-stable-decay as the default").
    decay_fraction: float = 0.2
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 100
    workers: int = 2
    # Training examples: "" renders the synthetic scenes; else a tasks JSONL file
    # (one {"image", "question", "answer"} per line; docs/finetune.md).
    data: str = ""
    # Fine-tuning: start from this checkpoint's model and weights (no stage 1).
    init_from: str = ""
    # LoRA (vlmkit.lora): rank > 0 attaches adapters and trains only them.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Tuple[str, ...] = lora.DEFAULT_TARGETS
    # "auto" (bf16 where the hardware computes it natively: resolve_precision),
    # "fp32" or "bf16" (autocast; float32 weights and optimizer state). bf16 wants
    # torch's threads on the cores (`vlmkit train` sets them).
    precision: str = "auto"
    # Sequence packing: each batch's examples share rows of at most this many decoder
    # positions (the same examples, loss and gradients; fewer padded positions:
    # docs/training.md, "Sequence packing"). -1: the decoder's max_len; 0: one example per row.
    pack_to: int = -1
    # Sampling weight of each task kind in the VLM stage: every example of a kind of
    # weight w is in an epoch floor(w) times, plus once more with probability
    # w - floor(w) (drawn once, from the run's seed); kinds not named weigh 1.
    # None: SYNTHETIC_TASK_WEIGHTS on the synthetic scenes, every kind 1 on a tasks
    # file. Measured in docs/training.md ("Task weights", "Spatial questions",
    # "Boxes, now that the tokens bind").
    task_weights: Optional[Dict[str, float]] = None
    # Synthetic scenes: train on a segment example for every object of a scene, not
    # only the one the scene asks about (evaluation is unchanged): the model learns to
    # find a named object from seeing every object named. None: on for the synthetic
    # scenes (a tasks file has no scenes to draw from; True with one is an error).
    # With the spatial weight 2 (SYNTHETIC_TASK_WEIGHTS) segment IoU on the validation
    # split 0.306 / 0.383 -> 0.511 / 0.502 at seeds 0 / 1, colour, shape and count
    # still >= 0.975, spatial 0.967 / 0.935; with spatial at 3 the larger share of
    # segment examples cost colour (seed 0, 0.980 -> 0.855) or shape (seed 1, 0.995
    # -> 0.930) (docs/training.md, "Segmentation: every object, and room for it").
    segment_every_object: Optional[bool] = None
    # Synthetic scenes: train on a spatial question for every ordered pair of objects
    # apart, not only the one the scene asks (evaluation is unchanged): "is A left of B"
    # and "is B left of A" of one image, so that the answer can only come from where
    # the two objects are. None: off.
    spatial_every_pair: Optional[bool] = None


# The synthetic data's task weights. The spatial question twice: it is asked of the
# 62% of scenes that have two objects apart, once per scene; at weight 1 the decoder
# learnt to compare two objects' places at one seed in two (validation spatial
# 0.537 / 0.740 at seeds 0 / 1), at 3 0.927 / 0.829 (docs/training.md, "Spatial
# questions"); since every object is segmented (VlmRun.segment_every_object) 2,
# which leaves the segment examples room (at 3 colour fell to 0.855 at seed 0, at
# 1.5 spatial to 0.805; "Segmentation: every object, and room for it"). The boxes'
# tasks more and the two shortest answers less
# (detection 2, segmentation 1.5, count and OCR 0.5): with the dense stage 1 the
# boxes gain and no question moves by more than 0.025 (validation, seeds 0 / 1: detection
# mAP@0.5 0.510 / 0.361 -> 0.765 / 0.748, segment IoU 0.244 / 0.208 -> 0.306 / 0.383,
# colour 0.960 / 1.000 -> 0.980 / 0.990, spatial 0.967 / 0.967 -> 0.984 / 1.000;
# docs/training.md, "Boxes, now that the tokens bind"). With the tags-only stage 1
# the same weights had cost colour and spatial.
SYNTHETIC_TASK_WEIGHTS: Dict[str, float] = {"spatial": 2.0, "detection": 2.0, "segment": 1.5, "count": 0.5,
                                            "ocr": 0.5}


def run_spatial_every_pair(run: "VlmRun") -> bool:
    """Whether ``run`` trains on a spatial question for every pair of objects
    (VlmRun.spatial_every_pair: None = off); refused with a tasks file."""
    if run.data and run.spatial_every_pair:
        raise ValueError("train: spatial_every_pair applies to the synthetic scenes, not to a tasks file "
                         f"('{run.data}')")
    return bool(run.spatial_every_pair)


def run_task_weights(run: "VlmRun") -> Dict[str, float]:
    """The task weights ``run`` trains with (VlmRun.task_weights)."""
    if run.task_weights is not None:
        return dict(run.task_weights)
    return {} if run.data else dict(SYNTHETIC_TASK_WEIGHTS)


def run_segment_every_object(run: "VlmRun") -> bool:
    """Whether ``run`` trains on every object's outline (VlmRun.segment_every_object:
    None is on for the synthetic scenes, off for a tasks file; True with a tasks file
    is refused rather than ignored)."""
    if run.segment_every_object is None:
        return not run.data
    if run.data and run.segment_every_object:
        raise ValueError("train: segment_every_object applies to the synthetic scenes, not to a tasks file "
                         f"('{run.data}')")
    return bool(run.segment_every_object)


# The VLM stage's steps per precision (docs/training.md, "Mixed precision" and
# "Sequence packing" measure what each buys): more steps in bf16, within the
# 15-minute budget of the 2-core reference machine. The cross-attention layers cost
# ~15% per step (157-163 samples/s against 191-206 for concat fusion on 2026-12-05):
# 3,900 steps ran 15 min 48 s end to end and 3,300 steps 15 min 23 s on a slower
# hour (stage 1 took 212 s instead of 138), so the budget buys 3,000 (1,000 in fp32).
STEPS = {"fp32": 1000, "bf16": 3000}


def resolve_precision(precision: str = "auto") -> str:
    """"auto" -> "bf16" on CUDA or on CPUs with native bfloat16 arithmetic
    (AVX-512 BF16 or AMX), else "fp32"; other values are checked and returned."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def labelled_boxes(text_out: str, value, width: int, height: int) -> List[Tuple[str, List[float]]]:
    """(label, box in pixels of a width x height image) of each box of a detection
    answer (``{"Object":[...], "Bounding_box":[...]}``, the synthetic data's and the
    real-image datasets' layout), the k-th label naming the k-th box; boxes past the
    labels, or in text that is not that JSON, get "". ``value`` is
    ``json.loads(text_out)``, or None when it does not parse."""
    from . import parse_boxes
    labels = value.get("Object") if isinstance(value, dict) else None
    labels = labels if isinstance(labels, list) else []
    return [(labels[r] if r < len(labels) and isinstance(labels[r], str) else "", box)
            for r, box in enumerate(parse_boxes(text_out, width, height))]


def scene_tasks(sample: Dict, every_object: bool = False, every_pair: bool = False) -> List[Dict[str, str]]:
    """(kind, question, answer) examples of one synthetic scene. ``every_object``: also
    a segment example for each of the scene's other objects; ``every_pair``: also a
    spatial question for each other ordered pair of objects whose centres are 4 px or
    more apart (the rule the scenes' own question follows), both "is A left of B" and
    "is B left of A". Both come after the scene's own examples, which stay as they are;
    the evaluation asks only the scene's own questions."""
    tasks = [{"kind": "caption", "question": PROMPTS["caption"], "answer": sample["caption"]}]
    tasks += [{"kind": q["kind"], "question": q["question"], "answer": q["answer"]} for q in sample["questions"]]
    if sample["ocr"]:
        tasks.append({"kind": "ocr", "question": PROMPTS["ocr"], "answer": sample["ocr"]})
    tasks.append({"kind": "detection", "question": PROMPTS["detection"], "answer": compact(sample["detection"])})
    tasks.append({"kind": "segment", "question": sample["segment"]["question"], "answer": sample["segment"]["answer"]})
    tasks.append({"kind": "extraction", "question": PROMPTS["extraction"], "answer": compact(sample["extraction"])})
    if every_object:  # after the scene's own examples, which stay as they were
        outlines = sample["segmentation"]
        for label, outline in zip(outlines["Object"], outlines["Polygon"]):
            question = f"Segment the {label}."
            if question != sample["segment"]["question"] and len(outline) >= 6:
                tasks.append({"kind": "segment", "question": question, "answer": segment_answer(label, outline)})
    if every_pair:
        own = {q["question"] for q in sample["questions"] if q["kind"] == "spatial"}
        centre = [(o["box"][0] + o["box"][2]) / 2 for o in sample["objects"]]
        for i, a in enumerate(sample["objects"]):
            for j, b in enumerate(sample["objects"]):
                question = f"Is the {a['label']} left of the {b['label']}?"
                if i != j and abs(centre[i] - centre[j]) >= 4 and question not in own:
                    tasks.append({"kind": "spatial", "question": question,
                                  "answer": "yes" if centre[i] < centre[j] else "no"})
    return tasks


def segment_answer(label: str, outline: List[int]) -> str:
    """The synthetic scenes' answer to "Segment the <label>." for one outline on the
    0..999 grid, written as SyntheticDataset writes its own (compact JSON)."""
    return json.dumps({"Object": [label], "Polygon": [outline]}, separators=(",", ":"))


def task_manifest_path(folder: str, every_object: bool = False, every_pair: bool = False) -> str:
    """Where write_task_manifest writes the examples of ``folder``'s scenes."""
    return os.path.join(folder, "tasks" + ("-every-object" if every_object else "") +
                        ("-every-pair" if every_pair else "") + ".jsonl")


def write_task_manifest(folder: str, scenes: int, seed: int, image_size: int, every_object: bool = False,
                        every_pair: bool = False) -> str:
    """Synthetic scenes as PNGs plus tasks.jsonl (one example per line; with
    ``every_object`` / ``every_pair``, tasks-every-object[-every-pair].jsonl:
    scene_tasks); reused when present."""
    manifest = task_manifest_path(folder, every_object, every_pair)
    if os.path.exists(manifest):
        return manifest
    dataset = data.SyntheticDataset(scenes, image_size=image_size, seed=seed)
    dataset.write(folder)
    with open(os.path.join(folder, "manifest.jsonl")) as f, open(manifest + ".partial", "w") as out:
        for index, line in enumerate(f):
            entry = json.loads(line)
            for task in scene_tasks(dataset[index], every_object, every_pair):
                out.write(json.dumps({"image": entry["image"], **task}) + "\n")
    os.replace(manifest + ".partial", manifest)
    return manifest


def weighted_manifest(manifest: str, weights: Dict[str, float], seed: int, folder: str, write: bool = True,
                      may_be_absent: Collection[str] = ()) -> str:
    """A tasks JSONL in ``folder`` in which each example of kind k appears
    floor(w_k) times plus once more with probability frac(w_k) (one draw per example
    from ``seed``; kinds not in ``weights`` once). The manifest itself when every
    weight is 1. With ``write`` False only the path (another rank writes it). A
    weight for a kind the data does not have is an error, unless ``may_be_absent``
    names that kind (the data's default weights: a few scenes may have no spatial
    question or no word), when it weighs nothing."""
    import random
    for kind, w in weights.items():
        if not isinstance(kind, str) or not isinstance(w, (int, float)) or not (0 <= w <= 100) or w != w:
            raise ValueError(f"task weight of {kind!r} must be a number in [0, 100], got {w!r}")
    if all(w == 1 for w in weights.values()):
        return manifest
    tag = "-".join(f"{k}{weights[k]:g}" for k in sorted(weights) if weights[k] != 1)
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, f"tasks-w{tag}-seed{seed}.jsonl")
    if not write:
        return out
    rng = random.Random(seed)
    written, seen = 0, set()
    with open(manifest) as f, open(out + ".partial", "w") as dst:
        for line in f:
            kind = json.loads(line).get("kind", "")
            seen.add(kind)
            w = weights.get(kind, 1.0)
            copies = int(w) + (rng.random() < w - int(w))
            dst.write(line * copies)
            written += copies
    unknown = sorted(set(weights) - seen - set(may_be_absent))
    if unknown:
        os.remove(out + ".partial")
        raise ValueError(f"task weights name kinds the data does not have: {unknown}; its kinds are {sorted(seen)}")
    if written == 0:
        os.remove(out + ".partial")
        raise ValueError(f"task weights {weights} leave no training examples")
    os.replace(out + ".partial", out)
    return out


def majority_answers(scenes: int, seed: int, image_size: int) -> Dict[str, str]:
    """The most frequent answer of each question kind (and OCR) in training scenes:
    the best answer that ignores the image."""
    dataset = data.SyntheticDataset(scenes, image_size=image_size, seed=seed)
    counts: Dict[str, Dict[str, int]] = {}
    for i in range(scenes):
        for task in scene_tasks(dataset[i]):
            if task["kind"] in VQA_KINDS + ("ocr",):
                kind = counts.setdefault(task["kind"], {})
                kind[task["answer"]] = kind.get(task["answer"], 0) + 1
    return {k: max(v.items(), key=lambda kv: (kv[1], kv[0]))[0] for k, v in counts.items()}


@torch.no_grad()
def evaluate(model: EncoderDecoder, scenes: int, seed: int, image_size: int, batch: int = 16,
             baselines: Optional[Dict[str, str]] = None, unconstrained: bool = False) -> Dict[str, float]:
    """Per-task metrics on held-out synthetic scenes (greedy decoding; JSON tasks
    constrained). With ``baselines`` (majority_answers of the training scenes) each
    VQA accuracy and the OCR error rate get ``<kind>/baseline``: the same metric for
    the majority answer, which ignores the image. With ``unconstrained`` the JSON
    tasks are also generated without their schema, and ``<kind>/valid_json_unconstrained``
    says how often the model alone writes valid JSON."""
    was_training = model.training
    model.eval()
    dataset = data.SyntheticDataset(scenes, image_size=image_size, seed=seed)
    examples = []
    for i in range(scenes):
        sample = dataset[i]
        pixels, _ = data.preprocess(sample["image"], image_size, "square", normalize="clip")
        for task in scene_tasks(sample):
            examples.append((pixels, task, sample))
    results: Dict[str, List[float]] = {}
    captions: List[tuple] = []
    det_predictions: List[tuple] = []
    det_truths: List[tuple] = []
    seg_predictions: List[tuple] = []
    seg_truths: List[tuple] = []
    for kind in sorted({t["kind"] for _, t, _ in examples}):
        chunk = [e for e in examples if e[1]["kind"] == kind]
        schema = TASK_SCHEMAS.get(kind)
        for start in range(0, len(chunk), batch):
            part = chunk[start:start + batch]
            images = torch.stack([p for p, _, _ in part])
            prompts = [data.chat_prompt("<image>" + t["question"]) for _, t, _ in part]
            outputs = model.generate(images, prompts, 160 if schema else 96, schema=schema)
            if schema and unconstrained:
                for free in model.generate(images, prompts, 160):
                    try:
                        json.loads(free)
                        ok = 1.0
                    except ValueError:
                        ok = 0.0
                    results.setdefault(f"{kind}/valid_json_unconstrained", []).append(ok)
            for number, (out, (_, task, sample)) in enumerate(zip(outputs, part)):
                truth = task["answer"]
                image_id = start + number
                if kind == "caption":
                    captions.append((out, truth))
                results.setdefault(f"{kind}/exact_match", []).append(float(out == truth))
                if baselines and kind in baselines:
                    guess = baselines[kind]
                    results.setdefault(f"{kind}/baseline", []).append(
                        char_error_rate(guess, truth) if kind == "ocr" else float(guess == truth))
                if kind == "ocr":
                    results.setdefault("ocr/cer", []).append(char_error_rate(out, truth))
                if kind in TASK_SCHEMAS:
                    try:
                        value = json.loads(out)
                        results.setdefault(f"{kind}/valid_json", []).append(1.0)
                    except ValueError:
                        value = None
                        results.setdefault(f"{kind}/valid_json", []).append(0.0)
                    if kind == "detection":
                        named = labelled_boxes(out, value, image_size, image_size)
                        for rank, (label, box) in enumerate(named):
                            det_predictions.append((image_id, label, box, -rank))
                        det_truths += [(image_id, o["label"], o["box"]) for o in sample["objects"]]
                        ious = labelled_ious([l for l, _ in named], [b for _, b in named], sample["objects"])
                        results.setdefault("detection/mean_iou", []).append(sum(ious) / len(ious))
                    if kind == "segment":
                        named = segment_masks(out, value, image_size)
                        seg_predictions += [(image_id, l, m, -rank) for rank, (l, m) in enumerate(named)]
                        truth_objects = [(o["label"], sample["masks"][n]) for n, o in enumerate(sample["objects"])
                                         if o["label"] in json.loads(truth)["Object"]]
                        seg_truths += [(image_id, l, m) for l, m in truth_objects]
                        ious = segmentation_scores(named, truth_objects)
                        results.setdefault("segment/mean_iou", []).append(sum(ious) / len(ious))
                    if kind == "extraction" and isinstance(value, dict):
                        fields = json.loads(truth)
                        results.setdefault("extraction/field_accuracy", []).append(
                            sum(value.get(k) == v for k, v in fields.items()) / len(fields))
    model.train(was_training)
    metrics = {k: sum(v) / len(v) for k, v in sorted(results.items())}
    if captions:
        metrics["caption/bleu4"] = bleu4([c for c, _ in captions], [r for _, r in captions])
    if det_truths:
        # Boxes come without confidences: earlier boxes of an answer rank higher.
        metrics["detection/map50"] = average_precision(det_predictions, det_truths, 0.5)
    if seg_truths:
        metrics["segment/mask_map50"] = average_precision(seg_predictions, seg_truths, 0.5, iou=mask_iou)
    return dict(sorted(metrics.items()))


TASK_SCHEMAS = {"detection": DETECTION_SCHEMA, "segment": SEGMENTATION_SCHEMA, "extraction": EXTRACTION_SCHEMA}


def labelled_ious(labels: List, boxes: List, objects: List[Dict]) -> List[float]:
    """Each object's IoU with the best predicted box of its own label (0 if none): a
    right box under a wrong label does not count. ``labels[r]`` names ``boxes[r]``."""
    named = list(zip(labels, boxes))
    return [max([box_iou(b, o["box"]) for l, b in named if l == o["label"]] or [0.0]) for o in objects]


def segment_masks(text_out: str, value, size: int) -> List[Tuple[str, torch.Tensor]]:
    """(label, mask) of each outline of a segmentation answer, labels from its
    "Object" list in order ("" past its end), rasterised at size x size."""
    from . import parse_polygons
    labels = value.get("Object", []) if isinstance(value, dict) else []
    out = []
    for rank, polygon in enumerate(parse_polygons(text_out, size, size)):
        label = labels[rank] if rank < len(labels) and isinstance(labels[rank], str) else ""
        out.append((label, data.polygon_to_mask([polygon], size, size)))
    return out


def scene_tags(sample: Dict) -> List[str]:
    """What a scene shows, as tags for image-encoder pretraining: each object's
    colour, shape, both, and its centre cell on a 4x4 grid; the word; the count."""
    size = sample["image"].shape[0]
    tags = {f"n:{len(sample['objects'])}"}
    for o in sample["objects"]:
        colour, shape = o["label"].split()[:2]
        x1, y1, x2, y2 = o["box"]
        cell = f"{min(3, int(2 * (y1 + y2) / size))}{min(3, int(2 * (x1 + x2) / size))}"
        tags |= {f"c:{colour}", f"s:{shape}", f"o:{o['label']}", f"p:{cell}", f"op:{o['label']}@{cell}"}
    if sample["ocr"]:
        tags.add(f"w:{sample['ocr']}")
    return sorted(tags)


# scene_tags' prefixes, named in stage 1's per-kind F1 (pretrain/tag_f1_<name>).
TAG_KINDS = {"c:": "colour", "s:": "shape", "o:": "object", "op:": "object_cell", "p:": "cell", "w:": "word",
             "n:": "count"}

# Stage 1's "dense" loss: the tags' mean binary cross-entropy (over every tag column
# of the vocabulary) times 10, plus 0.1 times each per-token cross-entropy (the class,
# and the box digits, of the object under the token). Unweighted (1, 1, 1) the
# per-token terms took the gradient and the word tags were not learnt at all (held-out
# F1 0.000 against 0.925 for the tags alone; OCR CER 0.82 after the VLM stage); at
# (10, 0.1, 0.1) the words read 0.797, the tags 0.886 overall (0.857 alone), the
# token classes 0.952 (docs/training.md, "Dense stage 1").
DENSE_PRETRAIN_WEIGHTS = {"tags": 10.0, "class": 0.1, "digits": 0.1}

# Width ranks dense_targets tells apart: 0 the widest object of the scene, 1 the next, ...;
# every rank from the last one on shares the last class.
DENSE_WIDTH_RANKS = 3


def width_ranks(objects: List[Dict]) -> List[int]:
    """Each object's rank by box width, 0 the widest; equal widths rank in the objects'
    order (left to right), so rank 0 is the object whose colour the extraction answers'
    "Colour" field gives."""
    order = sorted(range(len(objects)), key=lambda i: (-(objects[i]["box"][2] - objects[i]["box"][0]), i))
    ranks = [0] * len(objects)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def dense_targets(sample: Dict, grid: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell targets of a scene on a grid x grid split of the image (the image
    encoder's token grid): the class of the object covering most of the cell (0:
    background, else 1 + colour * len(shapes) + shape, at least a fifth of the cell
    covered), the hundreds and tens digits of that object's four box coordinates
    on the 0..999 grid the detection answers use ([grid * grid, 8]; -1 on background),
    and that object's width rank (width_ranks, capped at DENSE_WIDTH_RANKS - 1; -1 on
    background)."""
    colours, shapes = data.SyntheticDataset.colours, data.SyntheticDataset.shapes
    masks = sample["masks"]
    cells = grid * grid
    classes = torch.zeros(cells, dtype=torch.long)
    digits = torch.full((cells, 8), -1, dtype=torch.long)
    ranks = torch.full((cells,), -1, dtype=torch.long)
    if masks.shape[0] == 0:
        return classes, digits, ranks
    coverage = torch.nn.functional.adaptive_avg_pool2d(masks.float(), grid).reshape(masks.shape[0], cells)
    share, owner = coverage.max(0)
    boxes = torch.tensor(sample["detection"]["Bounding_box"], dtype=torch.long)
    labels = torch.tensor([1 + colours.index(o["label"].split()[0]) * len(shapes) + shapes.index(o["label"].split()[1])
                           for o in sample["objects"]])
    covered = share >= 0.2
    classes[covered] = labels[owner[covered]]
    box = boxes[owner[covered]]
    digits[covered] = torch.cat([box // 100, (box // 10) % 10], 1)
    rank = torch.tensor(width_ranks(sample["objects"]), dtype=torch.long).clamp(max=DENSE_WIDTH_RANKS - 1)
    ranks[covered] = rank[owner[covered]]
    return classes, digits, ranks


def pretrain_image_encoder(model: EncoderDecoder, scenes: int, seed: int, steps: int, lr: float = 2e-3,
                           batch: int = 64, verbose: bool = True, precision: str = "fp32",
                           objective: str = "tags", rank_weight: float = 0.0) -> Dict[str, float]:
    """Stage 1: trains the model's image encoder (a standalone copy, then loaded back),
    like a VLM that starts from a pretrained vision tower. Objective "tags" (the
    default): every scene tag (multi-label, max-pooled tokens, linear head). "dense":
    the tags and what each token's cell shows (dense_targets: the covering object's
    class and its box digits, linear heads per token), so that the tokens the decoder
    reads say what is where; it needs the tokens on a square grid), and with
    ``rank_weight`` > 0 (VlmRun.pretrain_rank_weight; "dense" only) the width rank of
    that object too. Returns the held-out tag micro-F1 (and, for "dense", the
    per-token accuracies)."""
    from . import ConvStage, ViT
    if objective not in ("dense", "tags"):
        raise ValueError(f"pretrain objective must be 'dense' or 'tags', got {objective!r}")
    config = {k: v for k, v in model.config["image_encoder"].items() if k != "type"}
    size = config["image_size"]
    encoder = ViT(**config) if model.config["image_encoder"].get("type", "vit") == "vit" else ConvStage(**config)
    with torch.no_grad():
        token_count = encoder(torch.zeros(1, 3, size, size)).tokens.shape[1]
    grid = math.isqrt(token_count)
    dense = objective == "dense"
    if not (rank_weight >= 0 and math.isfinite(rank_weight)):
        raise ValueError(f"rank_weight must be a finite number >= 0, got {rank_weight!r}")
    if rank_weight > 0 and not dense:
        raise ValueError(f"rank_weight {rank_weight} needs objective 'dense' (a head per token), got {objective!r}")
    if dense and grid * grid != token_count:
        raise ValueError(f"pretrain objective 'dense' needs the image encoder's tokens on a square grid, "
                         f"got {token_count} tokens; pass pretrain_objective='tags' (--pretrain-objective tags)")
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=seed)
    images, tags, classes, digits, ranks = [], [], [], [], []
    for i in range(scenes):
        sample = dataset[i]
        images.append(data.preprocess(sample["image"], size, "square", normalize="clip")[0])
        tags.append(scene_tags(sample))
        if dense:
            c, d, r = dense_targets(sample, grid)
            classes.append(c)
            digits.append(d)
            ranks.append(r)
    vocab = {t: i for i, t in enumerate(sorted({t for ts in tags for t in ts}))}
    x = torch.stack(images)
    y = torch.zeros(len(x), len(vocab))
    for i, ts in enumerate(tags):
        y[i, [vocab[t] for t in ts]] = 1
    held = max(1, len(x) // 10)
    train_x, train_y, test_x, test_y = x[held:], y[held:], x[:held], y[:held]
    width = model.config["image_encoder"]["d_model"]
    head = torch.nn.Linear(width, len(vocab))
    if dense:
        num_classes = 1 + len(data.SyntheticDataset.colours) * len(data.SyntheticDataset.shapes)
        cls_y, digit_y, rank_y = torch.stack(classes), torch.stack(digits), torch.stack(ranks)
        train_cls, train_digits, train_ranks = cls_y[held:], digit_y[held:], rank_y[held:]
        class_head = torch.nn.Linear(width, num_classes)
        digit_head = torch.nn.Linear(width, 8 * 10)
        rank_head = torch.nn.Linear(width, DENSE_WIDTH_RANKS) if rank_weight > 0 else None

    def losses(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(tokens.max(1).values).float(),
                                                                    train_y[index])
        if dense:
            f = torch.nn.functional
            w = DENSE_PRETRAIN_WEIGHTS
            loss = w["tags"] * loss
            loss = loss + w["class"] * f.cross_entropy(class_head(tokens).float().flatten(0, 1),
                                                       train_cls[index].flatten())
            loss = loss + w["digits"] * f.cross_entropy(digit_head(tokens).float().reshape(-1, 10),
                                                        train_digits[index].flatten(), ignore_index=-1)
            if rank_head is not None:
                loss = loss + rank_weight * f.cross_entropy(rank_head(tokens).float().flatten(0, 1),
                                                          train_ranks[index].flatten(), ignore_index=-1)
        return loss

    parts = torch.nn.ModuleDict({"encoder": encoder, "head": head})
    if dense:
        parts.update({"class_head": class_head, "digit_head": digit_head})
        if rank_head is not None:
            parts["rank_head"] = rank_head

    def batches(epoch: int):
        """The steps' random draws of training scenes (one epoch of `steps` batches)."""
        generator = torch.Generator().manual_seed(seed + epoch)
        for _ in range(steps):
            index = torch.randint(0, len(train_x), (batch,), generator=generator)
            yield {"images": train_x[index], "index": index}

    def log(record: Dict) -> None:
        if verbose and "eval" not in record and record["step"] % 100 == 0:
            print(f"stage 1 (image encoder) step {record['step']}/{steps}  loss {record['loss']:.4f}  "
                  f"{record['samples_per_second']:.0f} images/s", flush=True)

    # AdamW at a constant lr, no clipping: the Trainer with warmup and decay off.
    start = time.perf_counter()
    trainer = Trainer(parts, loss=lambda b: losses(encoder(b["images"]).tokens, b["index"]), steps=steps, lr=lr,
                      weight_decay=0.05, warmup_steps=0, min_lr_ratio=1.0, clip_norm=0.0, log_every=100,
                      precision=precision)
    trainer.fit(batches, on_log=log)
    out: Dict[str, float] = {}
    with torch.no_grad():
        tokens = encoder(test_x).tokens
        predicted = head(tokens.max(1).values) > 0
        if dense:
            truth_cls = cls_y[:held]
            pred_cls = class_head(tokens).argmax(-1)
            foreground = truth_cls > 0
            out["pretrain/token_class_accuracy"] = (pred_cls[foreground] == truth_cls[foreground]).float().mean().item()
            truth_digits = digit_y[:held][foreground]
            pred_digits = digit_head(tokens).reshape(*tokens.shape[:2], 8, 10).argmax(-1)[foreground]
            out["pretrain/token_digit_accuracy"] = (pred_digits == truth_digits).float().mean().item()
            if rank_head is not None:
                truth_rank = rank_y[:held][foreground]
                pred_rank = rank_head(tokens).argmax(-1)[foreground]
                out["pretrain/token_rank_accuracy"] = (pred_rank == truth_rank).float().mean().item()
    truth = test_y.bool()

    def f1_of(columns) -> float:
        p, t = predicted[:, columns], truth[:, columns]
        return 2 * (p & t).sum().item() / max(1, p.sum().item() + t.sum().item())
    f1 = f1_of(slice(None))
    # Per kind of tag (scene_tags' prefixes): the word tags are what OCR reads, and the
    # first to go when another objective takes the gradient.
    for prefix, name in TAG_KINDS.items():
        columns = [i for t, i in vocab.items() if t.startswith(prefix)]
        if columns:
            out[f"pretrain/tag_f1_{name}"] = f1_of(columns)
    state = model.state_dict()
    state.update({f"image_encoder.{k}": v for k, v in encoder.state_dict().items()})
    model.load_state_dict(state)
    return {"pretrain/tag_f1": f1, **out, "pretrain/seconds": time.perf_counter() - start}


def _pyplot_and_log(log_path: str):
    """matplotlib's pyplot (headless) and the records of a metrics.jsonl; (None, [])
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, []
    return plt, [json.loads(line) for line in open(log_path) if line.strip()]


def plot_metrics(log_path: str, png_path: str) -> Optional[str]:
    """Loss (and learning rate) curves of a metrics.jsonl as a PNG; None without matplotlib."""
    plt, records = _pyplot_and_log(log_path)
    steps = [r for r in records if "loss" in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange", alpha=0.6, label="lr")
    lr.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


PROGRESS_KEYS = ("colour/exact_match", "shape/exact_match", "count/exact_match", "spatial/exact_match",
                 "caption/exact_match", "ocr/cer", "detection/mean_iou", "segment/mean_iou",
                 "extraction/field_accuracy")


def plot_task_progress(log_path: str, png_path: str) -> Optional[str]:
    """Held-out (validation) metric of each task against the step, from the eval
    records of a metrics.jsonl; dashed lines are the majority-answer baselines.
    None without matplotlib or without eval records."""
    plt, records = _pyplot_and_log(log_path)
    evals = [r for r in records if "eval" in r]
    if not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, key in enumerate(PROGRESS_KEYS):
        points = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
        if not points:
            continue
        colour = f"C{i}"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=key)
        base = evals[-1]["eval"].get(key.split("/")[0] + "/baseline")
        if base is not None:
            ax.axhline(base, color=colour, linestyle="--", alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("validation metric (CER: lower is better)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def image_tokens_per_placeholder(model: EncoderDecoder, size: int) -> int:
    """Decoder positions one ``<image>`` takes: the projector's tokens per image with
    concat fusion, 1 with cross-attention (the image is the cross-attention memory)."""
    if model.config.get("fusion") != "concat":
        return 1
    with torch.no_grad():
        return int(model.cpp_module.encode_images(torch.zeros(1, 3, size, size)).shape[1])


def train(run: VlmRun = VlmRun(), config: Optional[dict] = None, out_dir: str = "runs/vlm",
          data_dir: Optional[str] = None, verbose: bool = True, resume: bool = True) -> Dict[str, float]:
    """Trains with the C++ Trainer, evaluates every task on held-out scenes and writes
    out_dir/{checkpoints/, metrics.jsonl, eval.json, loss.png}. With ``resume`` an
    interrupted run continues from its latest checkpoint. Under torch.distributed
    (``vlmkit train --nproc N``) every rank trains on its slice of each global batch
    and rank 0 writes files and evaluates."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    every_object = run_segment_every_object(run)  # refuses the option with a tasks file
    every_pair = run_spatial_every_pair(run)
    if run.encoder_lr < 0 or (run.encoder_lr > 0 and "image_encoder" in run.freeze):
        raise ValueError(f"encoder_lr {run.encoder_lr}: must be >= 0, and it applies only when the image encoder "
                         f"trains (freeze is {list(run.freeze)}; pass freeze without 'image_encoder')")
    if run.batch_size % world:
        raise ValueError(f"batch size {run.batch_size} does not split over {world} processes")
    torch.manual_seed(run.seed)
    precision = resolve_precision(run.precision)
    steps = run.steps or STEPS[precision]
    if run.init_from:
        from .checkpoint import load_model
        if config is not None:
            raise ValueError("train: pass either a config or init_from (whose model is used), not both")
        model = load_model(run.init_from)
        if model.config.get("architecture") != "encoder_decoder":
            raise ValueError(f"train: {run.init_from} holds a {model.config.get('architecture')!r} model; "
                             "this recipe fine-tunes encoder_decoder models")
        if lora.layers(model):
            raise ValueError(f"train: {run.init_from} carries LoRA adapters; fine-tune its base, or merge them first "
                             "(vlmkit.lora.remove) and save the merged model")
        config = model.config
    else:
        config = config or SMALL_VLM
        model = EncoderDecoder(config)
    size = config["image_encoder"]["image_size"]
    if run.data:
        if not os.path.isfile(run.data):
            raise FileNotFoundError(f"train: no tasks file at '{run.data}'")
        manifest = run.data
    else:
        data_dir = data_dir or os.path.join(out_dir, f"synthetic-{run.train_scenes}-{size}-seed{run.seed}")
        if rank == 0:
            write_task_manifest(data_dir, run.train_scenes, run.seed, size, every_object, every_pair)
        if distributed:
            dist.barrier()
        manifest = task_manifest_path(data_dir, every_object, every_pair)
    # Images are named relative to the examples file they come from.
    image_root = os.path.dirname(os.path.abspath(manifest))
    task_weights = run_task_weights(run)
    if task_weights:
        # The data's default weights may name kinds a small synthetic set lacks; a
        # weight the user changed must find its kind.
        defaults = {} if run.data else SYNTHETIC_TASK_WEIGHTS
        optional = {k for k, w in task_weights.items() if defaults.get(k) == w}
        if rank == 0:
            weighted_manifest(manifest, task_weights, run.seed, out_dir, may_be_absent=optional)
        if distributed:
            dist.barrier()
        manifest = weighted_manifest(manifest, task_weights, run.seed, out_dir, write=False, may_be_absent=optional)
    if run.pack_to < -1:
        raise ValueError(f"pack_to must be -1 (the decoder's max_len), 0 (off) or a budget, got {run.pack_to}")
    pack_to = model.config["decoder"]["max_len"] if run.pack_to == -1 else run.pack_to
    loader = data.Loader(manifest, image_root=image_root, batch_size=run.batch_size // world, num_workers=run.workers,
                         image_size=size,
                         seed=run.seed, drop_last=True, color_jitter=0.1, rank=rank, world_size=world,
                         pack_to=pack_to, pack_image_tokens=image_tokens_per_placeholder(model, size))
    adapted: List[str] = []
    if run.lora_rank > 0:
        # The base is frozen; every selected layer's adapter trains, the image encoder's included.
        adapted = lora.apply(model, rank=run.lora_rank, alpha=run.lora_alpha, dropout=run.lora_dropout,
                             target_modules=list(run.lora_targets))
    trainer = Trainer(model, steps=steps, lr=run.lr, weight_decay=run.weight_decay, warmup_steps=run.warmup,
                      decay_fraction=run.decay_fraction, log_every=run.log_every,
                      checkpoint_every=run.checkpoint_every, output_dir=out_dir,
                      distributed=distributed, eval_every=run.eval_every if run.val_scenes > 0 else 0,
                      freeze=[] if adapted else list(run.freeze), precision=precision,
                      group_lr={"image_encoder": run.encoder_lr} if run.encoder_lr > 0 else {})
    params = sum(p.numel() for p in model.parameters())
    if verbose and rank == 0 and adapted:
        trainable = sum(p.numel() for p in lora.trainable_parameters(model))
        print(f"LoRA: rank {run.lora_rank} on {len(adapted)} layers, {trainable / 1e3:.1f} K trainable parameters "
              f"({100 * trainable / params:.2f}%)", flush=True)
    resumed = trainer.resume() if resume else False
    if verbose and rank == 0:
        print(f"model: {params / 1e6:.2f} M parameters; data: {loader._loader.num_records} examples "
              f"from {run.train_scenes} scenes; {steps} steps in {precision}"
              + (f"; {world} processes" if distributed else ""), flush=True)
        if resumed:
            print(f"resumed from step {trainer.state['step']}", flush=True)
    stage1: Dict[str, float] = {}
    if not resumed and run.pretrain_steps > 0 and not run.init_from:
        # Every rank pretrains identically (same seed), so the weights agree.
        stage1 = pretrain_image_encoder(model, run.train_scenes, run.seed, run.pretrain_steps, run.pretrain_lr,
                                        verbose=verbose and rank == 0, precision=precision,
                                        objective=run.pretrain_objective,
                                        rank_weight=run.pretrain_rank_weight if run.pretrain_objective == "dense"
                                        else 0.0)
        if verbose and rank == 0:
            dense = (f", token class {stage1['pretrain/token_class_accuracy']:.3f}, box digits "
                     f"{stage1['pretrain/token_digit_accuracy']:.3f}" if "pretrain/token_class_accuracy" in stage1 else "")
            if "pretrain/token_rank_accuracy" in stage1:
                dense += f", width rank {stage1['pretrain/token_rank_accuracy']:.3f}"
            words = (f" (words {stage1['pretrain/tag_f1_word']:.3f})" if "pretrain/tag_f1_word" in stage1 else "")
            print(f"stage 1: held-out tag F1 {stage1['pretrain/tag_f1']:.3f}{words}{dense} "
                  f"in {stage1['pretrain/seconds']:.0f} s", flush=True)
    baselines = majority_answers(run.train_scenes, run.seed, size) if rank == 0 else None
    # Progress: every eval_every steps the validation scenes, per task, into metrics.jsonl
    # (and tasks.png); the reported figures come from the test scenes after training.
    evaluate_fn = None
    if rank == 0 and run.eval_every > 0 and run.val_scenes > 0:
        evaluate_fn = lambda step: evaluate(model, run.val_scenes, run.seed + VALIDATION_SEED_OFFSET, size,
                                            baselines=baselines)
    summary = trainer.fit(loader, evaluate=evaluate_fn)
    metrics = {}
    if rank == 0:
        start = time.perf_counter()
        metrics = evaluate(model, run.eval_scenes, run.seed + TEST_SEED_OFFSET, size, baselines=baselines,
                           unconstrained=True)
        metrics["eval_seconds"] = time.perf_counter() - start
        if verbose:
            print(f"test split: {run.eval_scenes} scenes in {metrics['eval_seconds']:.0f} s", flush=True)
    metrics.update(stage1)
    metrics.update({"train_seconds": summary["train_seconds"], "samples_per_second": summary["samples_per_second"],
                    "final_loss": summary["loss"], "parameters_millions": params / 1e6})
    if rank == 0:
        adapter = lora.save(model, os.path.join(out_dir, "adapter")) if adapted else None
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(model.config, f, indent=2)
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump({"run": {**asdict(run), "steps": steps, "precision": precision}, "metrics": metrics,
                       "checkpoint": summary.get("checkpoint"),
                       "adapter": adapter}, f, indent=2)
        plot_metrics(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"))
        plot_task_progress(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "tasks.png"))
    return metrics
