"""Training a Two-Tower model (`vlmkit train --architecture two_tower`) on the toy
shape pairing ("shapes": one coloured shape, captioned "a red circle") or on real
images that ship with Debian ("digits": the handwritten digits of python3-sklearn,
captioned "a handwritten seven"), with a watch for contrastive collapse."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, asdict
from typing import Dict, List, Optional, Tuple

import torch

from .metrics import CollapseMonitor, retrieval_recall
from . import text, toy
from .models import TwoTower

SMALL_CONFIG = {
    "architecture": "two_tower",
    # The conv stem matters here: the plain patch stem learns much less in the
    # same budget. Mean pooling, not the CLS token: with CLS pooling the run
    # collapses at learning rates >= 2e-3 (docs/training.md, "Two-Tower").
    "image_encoder": {"type": "vit", "image_size": 32, "patch_size": 8, "d_model": 64,
                      "depth": 2, "num_heads": 4, "stem": "conv", "pool": "mean"},
    "text_encoder": {"vocab_size": text.VOCAB_SIZE, "max_len": 32, "d_model": 64, "depth": 2,
                     "num_heads": 4, "pool": "mean"},
    "embed_dim": 64,
    "loss": "clip",
}

DATASETS = ("shapes", "digits")


@dataclass
class TwoTowerRun:
    steps: int = 1000
    # 0: one image of every class per batch (20 for shapes, 10 for digits); at most the class count.
    batch_size: int = 0
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    eval_images: int = 400
    log_every: int = 100
    data: str = "shapes"


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.25


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps times a cosine decay over ``steps``."""
    warmup = max(1, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def save_run(out_dir: str, model: torch.nn.Module, run, metrics: Dict[str, float]) -> None:
    """out_dir/{config.json, model.pt, metrics.json} of a finished run."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)
    torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"run": asdict(run), "metrics": metrics}, f, indent=2)


def pairs(run: TwoTowerRun, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, List[str]]:
    """(train images, train labels, held-out images, held-out labels, class captions)
    of run.data; every run of run.batch_size training samples holds distinct classes
    (no false negatives inside a contrastive batch)."""
    if run.data == "shapes":
        classes = toy.NUM_CLASSES
        _check_batch(run.batch_size, classes)
        images, labels = toy.shape_pairs(run.steps * run.batch_size, size, seed=run.seed,
                                         distinct_batches=run.batch_size)
        eval_images, eval_labels = toy.shape_pairs(run.eval_images, size, seed=run.seed + 10_000,
                                                   distinct_batches=classes)
        return images, labels, eval_images, eval_labels, toy.captions()
    if run.data != "digits":
        raise ValueError(f"TwoTowerRun.data must be one of {DATASETS}, got {run.data!r}")
    all_images, all_labels = toy.digits(size)
    _check_batch(run.batch_size, len(toy.DIGIT_NAMES))
    generator = torch.Generator().manual_seed(run.seed)
    order = torch.randperm(len(all_labels), generator=generator)
    held = order[:min(run.eval_images, len(order) // 4)]
    train_index = order[len(held):]
    # Held-out images in rounds of one per class (k-th of each class, then the
    # (k+1)-th), so that evaluate's runs of 10 hold distinct classes.
    held_labels = all_labels[held]
    rank = torch.zeros_like(held)
    for c in range(len(toy.DIGIT_NAMES)):
        members = (held_labels == c).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    held = held[torch.argsort(rank * len(toy.DIGIT_NAMES) + held_labels)]
    by_class = [train_index[all_labels[train_index] == c] for c in range(len(toy.DIGIT_NAMES))]
    picks = []
    for _ in range(run.steps):
        for c in torch.randperm(len(by_class), generator=generator)[:run.batch_size].tolist():
            picks.append(by_class[c][torch.randint(len(by_class[c]), (1,), generator=generator)])
    chosen = torch.cat(picks)
    return (all_images[chosen], all_labels[chosen], all_images[held], all_labels[held],
            [toy.digit_caption(c) for c in range(len(toy.DIGIT_NAMES))])


def _check_batch(batch: int, classes: int) -> None:
    if not 1 < batch <= classes:
        raise ValueError(f"TwoTowerRun.batch_size must be in [2, {classes}] (one image per class in a batch), "
                         f"got {batch}")


@torch.no_grad()
def evaluate(model: TwoTower, images: torch.Tensor, labels: torch.Tensor,
             captions: Optional[List[str]] = None) -> Dict[str, float]:
    """Zero-shot accuracy (image -> every class caption) and retrieval recall@1/5 in
    both directions inside runs of len(captions) held-out images of distinct classes."""
    captions = captions or toy.captions()
    was_training = model.training
    model.eval()
    ids, mask = text.encode_batch(captions, 32)
    probs = model.zero_shot(normalize(images), ids, mask)
    zero_shot = (probs.argmax(1) == labels).float().mean().item()
    sums: Dict[str, float] = {}
    chunks = 0
    k = len(captions)
    for start in range(0, len(labels) - k + 1, k):
        chunk = labels[start:start + k]
        if chunk.unique().numel() != len(chunk):
            continue
        image_embeds = model.encode_image(normalize(images[start:start + k]))
        text_embeds = model.encode_text(ids[chunk], mask[chunk])
        for key, value in retrieval_recall(image_embeds @ text_embeds.t(), (1, 5)).items():
            sums[key] = sums.get(key, 0.0) + value
        chunks += 1
    model.train(was_training)
    out = {"zero_shot_accuracy": zero_shot}
    out.update({k: v / chunks for k, v in sums.items()} if chunks else {})
    return out


def train(run: TwoTowerRun = TwoTowerRun(), config: Optional[dict] = None,
          out_dir: Optional[str] = None, verbose: bool = True) -> Dict[str, float]:
    """Trains, evaluates zero-shot accuracy and retrieval before and after on held-out
    images, and (with out_dir) writes config.json, model.pt and metrics.json. A run
    whose loss sits at chance with one text embedding for every caption is reported
    as collapsed (one line, and ``collapsed_at_step`` in the metrics)."""
    if run.steps <= 0 or run.warmup < 0 or run.lr <= 0:
        raise ValueError(f"TwoTowerRun: need steps > 0, warmup >= 0 and lr > 0, got {run.steps}, {run.warmup}, {run.lr}")
    if not run.batch_size:
        run = TwoTowerRun(**{**asdict(run), "batch_size": toy.NUM_CLASSES if run.data == "shapes"
                             else len(toy.DIGIT_NAMES)})
    torch.manual_seed(run.seed)
    model = TwoTower(config or SMALL_CONFIG)
    size = model.config["image_encoder"]["image_size"]
    images, labels, eval_images, eval_labels, captions = pairs(run, size)
    caption_ids, caption_mask = text.encode_batch(captions, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    schedule = warmup_cosine(optimizer, run.warmup, run.steps)
    before = evaluate(model, eval_images, eval_labels, captions)
    monitor = CollapseMonitor(after_step=run.warmup)
    collapsed_at: Optional[int] = None
    start = time.perf_counter()
    model.train()
    for step in range(run.steps):
        sl = slice(step * run.batch_size, (step + 1) * run.batch_size)
        batch_labels = labels[sl]
        out = model(normalize(images[sl]), caption_ids[batch_labels], caption_mask[batch_labels])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        message = monitor.update(step + 1, out.loss.item(), out.text_embeds.detach(), len(batch_labels))
        if message and collapsed_at is None:
            collapsed_at = step + 1
            print(message, flush=True)
        if verbose and ((step + 1) % run.log_every == 0 or step == 0):
            elapsed = time.perf_counter() - start
            rate = (step + 1) * run.batch_size / elapsed
            eta = (run.steps - step - 1) * run.batch_size / rate
            print(f"step {step + 1:5d}/{run.steps}  loss {out.loss.item():.4f}  "
                  f"{rate:7.1f} samples/s  eta {eta:5.1f}s", flush=True)
    seconds = time.perf_counter() - start
    after = evaluate(model, eval_images, eval_labels, captions)
    metrics = {"train_seconds": seconds, "samples_per_second": run.steps * run.batch_size / seconds,
               "final_loss": out.loss.item(),
               **{f"before/{k}": v for k, v in before.items()}, **after}
    if collapsed_at is not None:
        metrics["collapsed_at_step"] = collapsed_at
    if out_dir:
        save_run(out_dir, model, run, metrics)
    return metrics
