"""Training the small encoder-decoder VLM on the synthetic multitask data with a
plain torch.optim loop — what `vlmkit train` runs by default. Every scene of the
synthetic dataset yields captioning, VQA (colour, shape, count, spatial), OCR,
detection (JSON with 0..999 boxes) and JSON-extraction examples."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from . import data, text
from .models import EncoderDecoder

SMALL_VLM = {
    "architecture": "encoder_decoder",
    "image_encoder": {"type": "vit", "image_size": 64, "patch_size": 8, "d_model": 128, "depth": 3,
                      "num_heads": 4, "stem": "conv", "pool": "mean"},
    "projector": {"type": "pixel_shuffle", "factor": 2},
    "fusion": "concat",
    "attention": "prefix_lm",
    "decoder": {"d_model": 128, "depth": 4, "num_heads": 4, "max_len": 256},
}

PROMPTS = {"caption": "Describe the image.", "ocr": "What does the text say?",
           "detection": "Detect the shapes.", "extraction": "Extract the fields as JSON."}


@dataclass
class VlmRun:
    train_scenes: int = 3000
    eval_scenes: int = 60
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3  # measured: 2e-3 gave colour accuracy 0.48 vs 0.83 at 600 steps
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0
    log_every: int = 100
    workers: int = 2


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def scene_tasks(sample: Dict) -> List[Dict[str, str]]:
    """(kind, question, answer) examples of one synthetic scene."""
    tasks = [{"kind": "caption", "question": PROMPTS["caption"], "answer": sample["caption"]}]
    tasks += [{"kind": q["kind"], "question": q["question"], "answer": q["answer"]} for q in sample["questions"]]
    if sample["ocr"]:
        tasks.append({"kind": "ocr", "question": PROMPTS["ocr"], "answer": sample["ocr"]})
    tasks.append({"kind": "detection", "question": PROMPTS["detection"], "answer": compact(sample["detection"])})
    tasks.append({"kind": "extraction", "question": PROMPTS["extraction"], "answer": compact(sample["extraction"])})
    return tasks


def write_task_manifest(folder: str, scenes: int, seed: int, image_size: int) -> str:
    """Synthetic scenes as PNGs plus tasks.jsonl (one example per line); reused when present."""
    manifest = os.path.join(folder, "tasks.jsonl")
    if os.path.exists(manifest):
        return manifest
    dataset = data.SyntheticDataset(scenes, image_size=image_size, seed=seed)
    dataset.write(folder)
    with open(os.path.join(folder, "manifest.jsonl")) as f, open(manifest + ".partial", "w") as out:
        for index, line in enumerate(f):
            entry = json.loads(line)
            for task in scene_tasks(dataset[index]):
                out.write(json.dumps({"image": entry["image"], **task}) + "\n")
    os.replace(manifest + ".partial", manifest)
    return manifest


def char_error_rate(predicted: str, truth: str) -> float:
    previous = list(range(len(truth) + 1))
    for i, p in enumerate(predicted, 1):
        current = [i]
        for j, t in enumerate(truth, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (p != t)))
        previous = current
    return previous[-1] / max(1, len(truth))


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def evaluate(model: EncoderDecoder, scenes: int, seed: int, image_size: int, batch: int = 16) -> Dict[str, float]:
    """Per-task metrics on held-out synthetic scenes (greedy decoding; JSON tasks constrained)."""
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
    detection_schema = {"type": "object", "properties": {
        "Object": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "Bounding_box": {"type": "array", "maxItems": 4, "items": {"type": "array", "minItems": 4, "maxItems": 4,
                         "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}}
    extraction_schema = {"type": "object", "properties": {k: {"type": "string", "maxLength": 80}
                                                         for k in ("Description", "Colour", "Shapes", "Text")}}
    for kind in sorted({t["kind"] for _, t, _ in examples}):
        chunk = [e for e in examples if e[1]["kind"] == kind]
        schema = detection_schema if kind == "detection" else extraction_schema if kind == "extraction" else None
        for start in range(0, len(chunk), batch):
            part = chunk[start:start + batch]
            images = torch.stack([p for p, _, _ in part])
            prompts = [data.chat_prompt("<image>" + t["question"]) for _, t, _ in part]
            outputs = model.generate(images, prompts, 160 if schema else 96, schema=schema)
            for out, (_, task, sample) in zip(outputs, part):
                truth = task["answer"]
                results.setdefault(f"{kind}/exact_match", []).append(float(out == truth))
                if kind == "ocr":
                    results.setdefault("ocr/cer", []).append(char_error_rate(out, truth))
                if kind in ("detection", "extraction"):
                    try:
                        value = json.loads(out)
                        results.setdefault(f"{kind}/valid_json", []).append(1.0)
                    except ValueError:
                        value = None
                        results.setdefault(f"{kind}/valid_json", []).append(0.0)
                    if kind == "detection":
                        predicted = vlmkit_boxes(out, image_size)
                        ious = [max([box_iou(p, o["box"]) for p in predicted] or [0.0]) for o in sample["objects"]]
                        results.setdefault("detection/mean_iou", []).append(sum(ious) / len(ious))
                    if kind == "extraction" and isinstance(value, dict):
                        fields = json.loads(truth)
                        results.setdefault("extraction/field_accuracy", []).append(
                            sum(value.get(k) == v for k, v in fields.items()) / len(fields))
    model.train(was_training)
    return {k: sum(v) / len(v) for k, v in sorted(results.items())}


def vlmkit_boxes(text_out: str, size: int):
    from . import parse_boxes
    return parse_boxes(text_out, size, size)


def train(run: VlmRun = VlmRun(), config: Optional[dict] = None, out_dir: str = "runs/vlm",
          data_dir: Optional[str] = None, verbose: bool = True) -> Dict[str, float]:
    torch.manual_seed(run.seed)
    config = config or SMALL_VLM
    size = config["image_encoder"]["image_size"]
    data_dir = data_dir or os.path.join(out_dir, f"synthetic-{run.train_scenes}-{size}-seed{run.seed}")
    manifest = write_task_manifest(data_dir, run.train_scenes, run.seed, size)
    loader = data.Loader(manifest, batch_size=run.batch_size, num_workers=run.workers, image_size=size,
                         seed=run.seed, drop_last=True, color_jitter=0.1)
    model = EncoderDecoder(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms, biases, gates
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=run.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / run.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, run.steps) / run.steps)))
    params = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"model: {params / 1e6:.2f} M parameters; data: {loader._loader.num_records} examples "
              f"from {run.train_scenes} scenes", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "metrics.jsonl"), "w")
    start, step, samples = time.perf_counter(), 0, 0
    model.train()
    while step < run.steps:
        for batch in loader:
            out = model(batch["images"], batch["input_ids"], batch["padding_mask"], batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            samples += len(batch["indices"])
            if not math.isfinite(out.loss.item()):
                raise FloatingPointError(f"non-finite loss at step {step}")
            if step % run.log_every == 0 or step == 1:
                elapsed = time.perf_counter() - start
                rate = samples / elapsed
                entry = {"step": step, "loss": out.loss.item(), "samples_per_second": rate,
                         "lr": schedule.get_last_lr()[0]}
                log.write(json.dumps(entry) + "\n")
                log.flush()
                if verbose:
                    eta = (run.steps - step) * run.batch_size / rate
                    print(f"step {step:5d}/{run.steps}  loss {entry['loss']:.4f}  {rate:6.1f} samples/s  "
                          f"eta {eta:6.1f}s", flush=True)
            if step >= run.steps:
                break
    train_seconds = time.perf_counter() - start
    metrics = evaluate(model, run.eval_scenes, run.seed + 10_000, size)
    metrics.update({"train_seconds": train_seconds, "samples_per_second": samples / train_seconds,
                    "final_loss": out.loss.item(), "parameters_millions": params / 1e6})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)
    torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({"run": asdict(run), "metrics": metrics}, f, indent=2)
    log.close()
    return metrics
