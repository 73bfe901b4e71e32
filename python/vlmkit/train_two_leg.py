"""Training a Two-Leg model (`vlmkit train --architecture two_leg`) on visual
questions answered from a fixed answer list (VQA as classification): each
training image comes with one of three questions, and the classification head
picks the answer. The images are Two-Tower's (train_two_tower.pairs): the toy
shapes ("Which colour?", "Which shape?", "Is it a circle?") or the real
handwritten digits that ship with Debian ("Which digit?", "Is it even?", "Is it
above four?"). Only the question says which answer is wanted, and only the image
says what it is: neither leg alone does better than the majority answer."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import text, toy
from .models import TwoLeg
from .train_two_tower import SMALL_CONFIG as TWO_TOWER_CONFIG, TwoTowerRun, normalize, pairs, save_run
from .trainer import Trainer

def _shape_answer(question: int, label: int) -> str:
    colour, shape = toy.caption(label).split()[-2:]
    return (colour, shape, "yes" if shape == "circle" else "no")[question]


def _digit_answer(question: int, label: int) -> str:
    return (toy.DIGIT_NAMES[label], "yes" if label % 2 == 0 else "no", "yes" if label > 4 else "no")[question]


# Per data set: the questions, the answer list, answer(question, class) -> the answer,
# and the number of classes.
TASKS: Dict[str, Tuple[List[str], List[str], Callable[[int, int], str], int]] = {
    "shapes": (["Which colour?", "Which shape?", "Is it a circle?"],
               list(toy.COLORS) + list(toy.SHAPES) + ["yes", "no"], _shape_answer, toy.NUM_CLASSES),
    "digits": (["Which digit?", "Is it even?", "Is it above four?"],
               list(toy.DIGIT_NAMES) + ["yes", "no"], _digit_answer, len(toy.DIGIT_NAMES)),
}

SMALL_CONFIG = {
    "architecture": "two_leg",
    # The Two-Tower recipe's encoders (mean-pooled image tower: docs/training.md, "Two-Tower").
    "image_encoder": dict(TWO_TOWER_CONFIG["image_encoder"]),
    "text_encoder": dict(TWO_TOWER_CONFIG["text_encoder"]),
    "fusion": {"type": "concat_mlp", "dim": 128},
    # num_classes: the answer list of the run's data (set by train()).
    "head": {"type": "classification"},
}


@dataclass
class TwoLegRun(TwoTowerRun):
    """TwoTowerRun's fields; batches of 32 images of any classes."""
    batch_size: int = 32


def questions(labels: torch.Tensor, data: str, generator: Optional[torch.Generator] = None,
              cycle: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(question index, answer index) per image: questions drawn uniformly (or, with
    cycle, in turn), answered from the image's class."""
    asked, answers, answer, classes = TASKS[data]
    table = torch.tensor([[answers.index(answer(k, c)) for c in range(classes)] for k in range(len(asked))])
    q = (torch.arange(len(labels)) % len(asked) if cycle
         else torch.randint(0, len(asked), (len(labels),), generator=generator))
    return q, table[q, labels]


@torch.no_grad()
def evaluate(model: TwoLeg, images: torch.Tensor, labels: torch.Tensor, data: str) -> Dict[str, float]:
    """Accuracy per question on held-out images (every question asked of a third of
    them) and its image-blind baseline (that question's majority answer)."""
    asked = TASKS[data][0]
    was_training = model.training
    model.eval()
    ids, mask = text.encode_batch(asked, 32)
    q, truth = questions(labels, data, cycle=True)
    predicted = model(normalize(images), ids[q], mask[q]).logits.argmax(-1)
    model.train(was_training)
    out: Dict[str, float] = {}
    for k, question in enumerate(asked):
        rows = q == k
        key = question.rstrip("?").lower().replace(" ", "_")
        out[f"{key}/accuracy"] = (predicted[rows] == truth[rows]).float().mean().item()
        out[f"{key}/baseline"] = truth[rows].bincount().max().item() / max(1, int(rows.sum()))
    out["accuracy"] = (predicted == truth).float().mean().item()
    return out


def train(run: TwoLegRun = TwoLegRun(), config: Optional[dict] = None,
          out_dir: Optional[str] = None, verbose: bool = True) -> Dict[str, float]:
    """Trains, evaluates before and after on held-out images and (with out_dir)
    writes config.json, model.pt and metrics.json."""
    if run.steps <= 0 or run.warmup < 0 or run.lr <= 0 or run.batch_size < 2:
        raise ValueError(f"TwoLegRun: need steps > 0, warmup >= 0, lr > 0 and batch_size >= 2, got "
                         f"{run.steps}, {run.warmup}, {run.lr}, {run.batch_size}")
    if run.data not in TASKS:
        raise ValueError(f"TwoLegRun.data must be one of {tuple(TASKS)}, got {run.data!r}")
    torch.manual_seed(run.seed)
    asked, answers, _, classes = TASKS[run.data]
    config = copy.deepcopy(config or SMALL_CONFIG)
    config.setdefault("head", {})
    if config["head"].get("num_classes", len(answers)) != len(answers):
        raise ValueError(f"two_leg recipe: the head answers {len(answers)} classes for {run.data!r}, "
                         f"got num_classes={config['head']['num_classes']}")
    config["head"]["num_classes"] = len(answers)
    model = TwoLeg(config)
    size = model.config["image_encoder"]["image_size"]
    # The images of `steps` batches (a batch need not hold distinct classes here).
    per_batch = min(run.batch_size, classes)
    source = TwoTowerRun(steps=math.ceil(run.steps * run.batch_size / per_batch), batch_size=per_batch,
                         seed=run.seed, eval_images=run.eval_images, data=run.data)
    images, labels, eval_images, eval_labels, _ = pairs(source, size)
    question_ids, question_mask = text.encode_batch(asked, 32)
    asked_q, target = questions(labels, run.data, torch.Generator().manual_seed(run.seed + 1))
    batches = [{"images": normalize(images[sl]), "input_ids": question_ids[asked_q[sl]],
                "padding_mask": question_mask[asked_q[sl]], "labels": target[sl]}
               for sl in (slice(i * run.batch_size, (i + 1) * run.batch_size) for i in range(run.steps))]
    before = evaluate(model, eval_images, eval_labels, run.data)
    trainer = Trainer(model, steps=run.steps, lr=run.lr, weight_decay=run.weight_decay, warmup_steps=run.warmup,
                      clip_norm=1.0, log_every=run.log_every if verbose else 0)
    result = trainer.fit(batches, on_log=None if verbose else (lambda record: None))
    after = evaluate(model, eval_images, eval_labels, run.data)
    metrics = {"train_seconds": result["train_seconds"], "samples_per_second": result["samples_per_second"],
               "final_loss": result["loss"], **{f"before/{k}": v for k, v in before.items()}, **after}
    if out_dir:
        save_run(out_dir, model, run, metrics)
    return metrics
