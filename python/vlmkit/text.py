"""A byte-level text codec: no training, every UTF-8 string round-trips.

Ids: 0 = pad, 1 = bos, 2 = eos, byte b -> b + 3 (vocabulary of 259, inside the
text encoder's default 512). The C++ tokenizers of the data pipeline use the
same special ids.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def encode(text: str) -> List[int]:
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return [BOS] + [b + BYTE_OFFSET for b in text.encode("utf-8")] + [EOS]


def decode(ids: Sequence[int]) -> str:
    data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < VOCAB_SIZE)
    return data.decode("utf-8", errors="replace")


def encode_batch(texts: Sequence[str], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] (T = longest, at most max_len) and the padding mask
    (True = padding). Texts longer than max_len raise ValueError."""
    encoded = [encode(t) for t in texts]
    if not encoded:
        raise ValueError("expected at least one text, got an empty batch")
    longest = max(len(e) for e in encoded)
    if longest > max_len:
        raise ValueError(f"a text encodes to {longest} tokens, more than max_len={max_len}")
    ids = torch.full((len(encoded), longest), PAD, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
    return ids, ids.eq(PAD)
