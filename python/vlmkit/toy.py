"""Small image/text pairings for the Two-Tower recipe and tests: one coloured shape
on a noisy background rendered with torch ops, captioned "a red circle"
(deterministic from a seed), and the real handwritten digits that ship with
Debian's python3-sklearn. The multitask synthetic dataset of the data pipeline is
the full-featured one."""
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


# Real images that ship with a Debian package: the UCI handwritten digits
# (1,797 scans, 8x8 pixels, 17 grey levels) in Debian's python3-sklearn.
DIGITS_PATH = "/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(label: int) -> str:
    return f"a handwritten {DIGIT_NAMES[label]}"


def digits(image_size: int = 32, path: str = DIGITS_PATH) -> Tuple[torch.Tensor, torch.Tensor]:
    """The real handwritten digits: images [1797, 3, S, S] in [0, 1] (the 8x8 scans,
    bilinearly resized, grey in all three channels) and labels [1797] in 0..9."""
    import gzip
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits: no file at '{path}'; it ships with Debian's python3-sklearn "
                                "(apt-get install python3-sklearn; `make setup` installs it)")
    with gzip.open(path, "rt") as f:
        rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
    table = torch.tensor(rows)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"digits: expected rows of 64 pixels and a label in '{path}', got shape {tuple(table.shape)}")
    images = (table[:, :64] / 16).reshape(-1, 1, 8, 8)
    images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1), table[:, 64].long()
