"""Evaluation metrics of the tasks a VLM serves (pure Python, no extra dependencies)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Box = Sequence[float]


def char_error_rate(predicted: str, truth: str) -> float:
    """Levenshtein distance over characters divided by the reference length."""
    previous = list(range(len(truth) + 1))
    for i, p in enumerate(predicted, 1):
        current = [i]
        for j, t in enumerate(truth, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (p != t)))
        previous = current
    return previous[-1] / max(1, len(truth))


def bleu4(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (Papineni et al.) on whitespace tokens, one reference per
    candidate, uniform weights and the brevity penalty; 0 when any n-gram order has
    no match (no smoothing, as in the original definition)."""
    if len(candidates) != len(references):
        raise ValueError(f"bleu4: {len(candidates)} candidates but {len(references)} references")
    matches, totals = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, ref in zip(candidates, references):
        c, r = cand.split(), ref.split()
        cand_len += len(c)
        ref_len += len(r)
        for n in range(1, 5):
            cn = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
            rn = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(k, rn[g]) for g, k in cn.items())
            totals[n - 1] += max(0, len(c) - n + 1)
    if cand_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_precision)


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two same-size [H, W] masks (non-zero = inside);
    0 when both are empty."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"mask_iou: expected two [H, W] masks of one size, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a != 0, b != 0
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0


def average_precision(predictions: Sequence[Tuple[int, str, object, float]],
                      truths: Sequence[Tuple[int, str, object]], iou_threshold: float = 0.5,
                      iou: Optional[Callable[[object, object], float]] = None) -> float:
    """Mean over classes of all-point interpolated AP (PASCAL VOC 2010+).

    predictions: (image id, label, region, score); truths: (image id, label, region).
    Regions are pixel boxes [x1, y1, x2, y2] (``iou=box_iou``, the default) or masks
    (``iou=mask_iou``: mask AP). Generated regions carry no confidence: callers give
    earlier ones higher scores.
    """
    overlap_of = iou or box_iou
    classes = sorted({t[1] for t in truths})
    if not classes:
        return float("nan")
    # A prediction whose label is empty or names no class of the truths is a false
    # positive of the class of the truth it overlaps most in its image (of every
    # class if its image has none): an unlabelled box must not vanish from the count.
    predictions = list(predictions)
    known = set(classes)
    by_image: Dict[int, List[Tuple[str, Box]]] = {}
    for image, l, box in truths:
        by_image.setdefault(image, []).append((l, box))
    charged: Dict[str, List[float]] = {c: [] for c in classes}
    for image, l, box, score in predictions:
        if l in known:
            continue
        others = by_image.get(image, [])
        if others:
            charged[max(others, key=lambda t: overlap_of(box, t[1]))[0]].append(score)
        else:
            for c in classes:
                charged[c].append(score)
    aps = []
    for label in classes:
        gt: Dict[int, List[Box]] = {}
        for image, l, box in truths:
            if l == label:
                gt.setdefault(image, []).append(box)
        used = {image: [False] * len(boxes) for image, boxes in gt.items()}
        preds = [p for p in predictions if p[1] == label] + [(None, label, None, score) for score in charged[label]]
        preds.sort(key=lambda p: -p[3])
        tp, fp = [], []
        for image, _, box, _ in preds:
            if box is None:  # an unknown-label prediction charged to this class
                tp.append(0)
                fp.append(1)
                continue
            best, best_j = 0.0, -1
            for j, g in enumerate(gt.get(image, [])):
                overlap = overlap_of(box, g)
                if overlap > best:
                    best, best_j = overlap, j
            if best >= iou_threshold and not used[image][best_j]:
                used[image][best_j] = True
                tp.append(1)
                fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        n_gt = sum(len(b) for b in gt.values())
        recall, precision = [0.0], [1.0]
        ctp = cfp = 0
        for t, f in zip(tp, fp):
            ctp += t
            cfp += f
            recall.append(ctp / n_gt)
            precision.append(ctp / (ctp + cfp))
        ap = 0.0
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        for i in range(1, len(recall)):
            ap += (recall[i] - recall[i - 1]) * precision[i]
        aps.append(ap)
    return sum(aps) / len(aps)


def retrieval_recall(similarity: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Recall@k both ways for a square image x text similarity matrix whose
    diagonal holds the matching pairs. Ties with the match count as misses."""
    if similarity.dim() != 2 or similarity.size(0) != similarity.size(1):
        raise ValueError(f"retrieval_recall: expected a square [N, N] matrix, got {tuple(similarity.shape)}")
    if not torch.isfinite(similarity).all():
        raise ValueError("retrieval_recall: the similarity matrix holds NaN or infinite values")
    n = similarity.size(0)
    target = torch.arange(n)
    out = {}
    for name, sims in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        # How many others score at least as high as the match: a tie counts against
        # it, so a model whose similarities are all equal scores recall@1 = 0, not 1.
        rank = (sims >= sims[target, target].unsqueeze(1)).sum(1) - 1
        for k in ks:
            out[f"{name}_recall@{k}"] = (rank < k).float().mean().item()
    return out


def segmentation_scores(predicted: Sequence[Tuple[str, torch.Tensor]],
                        truth: Sequence[Tuple[str, torch.Tensor]]) -> List[float]:
    """Mask IoU of each true object of one image, matched by label: the IoU of its
    mask with the union of the predicted masks that carry its label (0 if none). A
    right outline under a wrong label does not count."""
    out = []
    for label, mask in truth:
        mine = [m for l, m in predicted if l == label]
        if not mine:
            out.append(0.0)
            continue
        union = mine[0] != 0
        for m in mine[1:]:
            union = union | (m != 0)
        out.append(mask_iou(union, mask))
    return out


class CollapseMonitor:
    """Watches a contrastive run for collapse: the loss within ``tolerance`` (a
    fraction) of its chance value ln(batch) and the batch's embeddings of different
    inputs one vector (mean pairwise cosine above ``spread``), both for ``patience``
    consecutive steps after step ``after_step`` (the warmup). ``update`` returns the
    one-line report the first time that holds (``reported_at`` then holds its step),
    else None."""

    def __init__(self, after_step: int = 0, patience: int = 20, tolerance: float = 0.02, spread: float = 0.99):
        if patience < 1 or not 0 < tolerance < 1 or not -1 < spread < 1:
            raise ValueError(f"CollapseMonitor: need patience >= 1, 0 < tolerance < 1 and -1 < spread < 1, "
                             f"got {patience}, {tolerance}, {spread}")
        self.after_step, self.patience, self.tolerance, self.spread = after_step, patience, tolerance, spread
        self.run = 0
        self.reported_at: Optional[int] = None

    def update(self, step: int, loss: float, embeddings: torch.Tensor, batch: int) -> Optional[str]:
        if embeddings.ndim != 2 or embeddings.shape[0] < 2:
            raise ValueError(f"CollapseMonitor.update: expected embeddings [B >= 2, D], got {tuple(embeddings.shape)}")
        chance = math.log(batch)
        flat = step > self.after_step and abs(loss - chance) <= self.tolerance * chance
        cosine = float("nan")
        if flat:  # the embeddings' spread only matters (and is only computed) at the chance loss
            unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
            n = unit.shape[0]
            cosine = ((unit @ unit.t()).sum() - n).item() / (n * (n - 1))
            flat = cosine > self.spread
        self.run = self.run + 1 if flat else 0
        if self.run < self.patience or self.reported_at is not None:
            return None
        self.reported_at = step
        return (f"collapse at step {step}: the loss has been at its chance value ln({batch}) = {chance:.3f} for "
                f"{self.patience} steps and the embeddings of different inputs are one vector (mean cosine "
                f"{cosine:.4f}); the run is not learning: lower the learning rate or lengthen the warmup "
                f"(docs/training.md, \"Two-Tower\")")
