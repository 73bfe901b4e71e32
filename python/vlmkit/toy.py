"""A small image/text pairing rendered with torch ops: one coloured shape on a
noisy background, captioned "a red circle". Deterministic from a seed. Used by
the Two-Tower demo and tests; the multitask synthetic dataset of the data
pipeline is the full-featured one."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

COLORS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.80),
}
SHAPES = ("square", "circle", "triangle", "cross")
NUM_CLASSES = len(COLORS) * len(SHAPES)


def caption(label: int) -> str:
    color = list(COLORS)[label // len(SHAPES)]
    return f"a {color} {SHAPES[label % len(SHAPES)]}"


def captions() -> List[str]:
    return [caption(i) for i in range(NUM_CLASSES)]


def render(label: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[3, size, size] float image in [0, 1] of class `label`."""
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    color = torch.tensor(list(COLORS.values())[label // len(SHAPES)])
    shape = SHAPES[label % len(SHAPES)]
    r = uniform(0.18, 0.30) * size
    cx, cy = uniform(r + 1, size - r - 1), uniform(r + 1, size - r - 1)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        mask = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    elif shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif shape == "triangle":  # apex up
        mask = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * (0.5 / 0.9) * math.sqrt(3) / 1.1)
    else:  # cross
        arm = r * 0.3
        mask = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    background = uniform(0.3, 0.6)
    image = background + 0.08 * torch.randn(3, size, size, generator=generator)
    image = torch.where(mask.unsqueeze(0), color.view(3, 1, 1).expand(3, size, size), image)
    return image.clamp(0, 1)


def shape_pairs(n: int, image_size: int = 32, seed: int = 0,
                distinct_batches: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 3, S, S] and labels [n]. With distinct_batches=k, every run of
    k consecutive samples has k different classes (no false negatives inside a
    contrastive batch of k)."""
    if n <= 0:
        raise ValueError(f"expected n > 0, got {n}")
    generator = torch.Generator().manual_seed(seed)
    if distinct_batches:
        if not 0 < distinct_batches <= NUM_CLASSES:
            raise ValueError(f"distinct_batches must be in [1, {NUM_CLASSES}], got {distinct_batches}")
        chunks = []
        while sum(len(c) for c in chunks) < n:
            chunks.append(torch.randperm(NUM_CLASSES, generator=generator)[:distinct_batches])
        labels = torch.cat(chunks)[:n]
    else:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    images = torch.stack([render(int(l), image_size, generator) for l in labels])
    return images, labels
