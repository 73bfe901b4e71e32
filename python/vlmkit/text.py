"""Text helpers over the C++ byte-level tokenizer (``vlmkit.ByteTokenizer``).

Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <image> (the literal "<image>" in a text),
4-7 reserved, byte b -> b + 8 (vocabulary of 264). Every UTF-8 string
round-trips.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _C

TOKENIZER = _C.ByteTokenizer()
PAD, BOS, EOS, IMAGE = TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.image_id
VOCAB_SIZE = TOKENIZER.vocab_size
IGNORE_INDEX = -100


def encode(text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return TOKENIZER.encode(text, add_bos, add_eos)


def decode(ids: Sequence[int]) -> str:
    return TOKENIZER.decode_bytes(list(ids)).decode("utf-8", errors="replace")


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


def training_batch(prompts: Sequence[str], answers: Sequence[str]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, padding_mask) for prompt -> answer pairs: input is
    <bos> prompt answer <eos>; labels hold the answer and <eos> and IGNORE_INDEX
    on the prompt and padding (the model shifts them by one)."""
    if len(prompts) != len(answers):
        raise ValueError(f"expected as many answers as prompts, got {len(answers)} and {len(prompts)}")
    rows = []
    for prompt, answer in zip(prompts, answers):
        p = encode(prompt, add_bos=True, add_eos=False)
        a = encode(answer, add_bos=False, add_eos=True)
        rows.append((p + a, [IGNORE_INDEX] * len(p) + a))
    longest = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), longest), PAD, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for i, (x, _) in enumerate(rows):
        mask[i, : len(x)] = False
    return ids, labels, mask
