"""Training a Two-Tower model (`vlmkit train --architecture two_tower`) on the toy
shape pairing ("shapes": one coloured shape, captioned "a red circle") or on real
images that ship with Debian ("digits": the handwritten digits of python3-sklearn,
captioned "a handwritten seven"), with a watch for contrastive collapse."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, asdict
from typing import Dict, List, Optional, Tuple

import torch

from .metrics import retrieval_recall
from . import text, toy
from .models import TwoTower
from .trainer import Trainer

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
    # One epoch of run.steps batches, in the order pairs() drew them (each batch
    # holds distinct classes); input_ids and padding_mask are each image's caption.
    batches = [{"images": normalize(images[sl]), "input_ids": caption_ids[labels[sl]],
                "padding_mask": caption_mask[labels[sl]]}
               for sl in (slice(i * run.batch_size, (i + 1) * run.batch_size) for i in range(run.steps))]
    before = evaluate(model, eval_images, eval_labels, captions)
    # The model's own loss, watched for collapse by the Trainer (one line when it happens).
    trainer = Trainer(model, steps=run.steps, lr=run.lr, weight_decay=run.weight_decay, warmup_steps=run.warmup,
                      clip_norm=1.0, log_every=run.log_every if verbose else 0)
    result = trainer.fit(batches, on_log=None if verbose else (lambda record: None))
    after = evaluate(model, eval_images, eval_labels, captions)
    metrics = {"train_seconds": result["train_seconds"], "samples_per_second": result["samples_per_second"],
               "final_loss": result["loss"],
               **{f"before/{k}": v for k, v in before.items()}, **after}
    monitor = trainer.collapse_monitor
    if monitor is not None and monitor.reported_at is not None:
        metrics["collapsed_at_step"] = monitor.reported_at
    if out_dir:
        save_run(out_dir, model, run, metrics)
    return metrics
