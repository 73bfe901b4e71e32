"""Training a Two-Tower model on the toy shape pairing: the end-to-end demo
that `vlmkit train` runs until the generative pipeline takes over."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, asdict
from typing import Dict, Optional

import torch

from .metrics import retrieval_recall
from . import text, toy
from .models import TwoTower

SMALL_CONFIG = {
    "architecture": "two_tower",
    # The conv stem matters here: the plain patch stem learns much less in the
    # same budget (docs/training.md).
    "image_encoder": {"type": "vit", "image_size": 32, "patch_size": 8, "d_model": 64,
                      "depth": 2, "num_heads": 4, "stem": "conv"},
    "text_encoder": {"vocab_size": text.VOCAB_SIZE, "max_len": 32, "d_model": 64, "depth": 2,
                     "num_heads": 4, "pool": "mean"},
    "embed_dim": 64,
    "loss": "clip",
}


@dataclass
class TwoTowerRun:
    steps: int = 1000
    batch_size: int = 20
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    eval_images: int = 400
    log_every: int = 100


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.25


@torch.no_grad()
def evaluate(model: TwoTower, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Zero-shot accuracy (image -> the 20 class captions) and retrieval
    recall@1/5 in both directions inside batches of 20 distinct classes."""
    was_training = model.training
    model.eval()
    ids, mask = text.encode_batch(toy.captions(), 32)
    probs = model.zero_shot(normalize(images), ids, mask)
    zero_shot = (probs.argmax(1) == labels).float().mean().item()
    sums: Dict[str, float] = {}
    chunks = 0
    for start in range(0, len(labels) - toy.NUM_CLASSES + 1, toy.NUM_CLASSES):
        chunk = labels[start:start + toy.NUM_CLASSES]
        if chunk.unique().numel() != len(chunk):
            continue
        image_embeds = model.encode_image(normalize(images[start:start + toy.NUM_CLASSES]))
        ids_c, mask_c = text.encode_batch([toy.caption(int(l)) for l in chunk], 32)
        text_embeds = model.encode_text(ids_c, mask_c)
        for key, value in retrieval_recall(image_embeds @ text_embeds.t(), (1, 5)).items():
            sums[key] = sums.get(key, 0.0) + value
        chunks += 1
    model.train(was_training)
    out = {"zero_shot_accuracy": zero_shot}
    out.update({k: v / chunks for k, v in sums.items()} if chunks else {})
    return out


def train(run: TwoTowerRun = TwoTowerRun(), config: Optional[dict] = None,
          out_dir: Optional[str] = None, verbose: bool = True) -> Dict[str, float]:
    torch.manual_seed(run.seed)
    model = TwoTower(config or SMALL_CONFIG)
    size = model.config["image_encoder"]["image_size"]
    images, labels = toy.shape_pairs(run.steps * run.batch_size, size, seed=run.seed,
                                     distinct_batches=run.batch_size)
    eval_images, eval_labels = toy.shape_pairs(run.eval_images, size, seed=run.seed + 10_000,
                                               distinct_batches=toy.NUM_CLASSES)
    ids_all, mask_all = text.encode_batch([toy.caption(int(l)) for l in labels], 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / run.warmup) * 0.5 * (1 + math.cos(math.pi * s / run.steps)))
    before = evaluate(model, eval_images, eval_labels)
    start = time.perf_counter()
    model.train()
    for step in range(run.steps):
        sl = slice(step * run.batch_size, (step + 1) * run.batch_size)
        out = model(normalize(images[sl]), ids_all[sl], mask_all[sl])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if verbose and ((step + 1) % run.log_every == 0 or step == 0):
            elapsed = time.perf_counter() - start
            rate = (step + 1) * run.batch_size / elapsed
            eta = (run.steps - step - 1) * run.batch_size / rate
            print(f"step {step + 1:5d}/{run.steps}  loss {out.loss.item():.4f}  "
                  f"{rate:7.1f} samples/s  eta {eta:5.1f}s", flush=True)
    seconds = time.perf_counter() - start
    after = evaluate(model, eval_images, eval_labels)
    metrics = {"train_seconds": seconds, "samples_per_second": run.steps * run.batch_size / seconds,
               "final_loss": out.loss.item(),
               **{f"before/{k}": v for k, v in before.items()}, **after}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(model.config, f, indent=2)
        torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"run": asdict(run), "metrics": metrics}, f, indent=2)
    return metrics
