"""Pure helpers to lay token-id lists out as padded batches.

An attention mask may have holes anywhere (left padding, padding between a shared prefix and
each row's own tokens, right padding of teacher-forced targets): every position with mask 1
sees exactly the earlier positions with mask 1, so a row's result never depends on the rows
it is batched with. Position ids count only the real tokens (``positions``).
"""
from __future__ import annotations

from typing import Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and attention mask [B, T] (long) with padding on ``side`` ("left"/"right")."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last ``new`` columns of a full (past + new) attention mask: the number
    of real tokens before each one (pad columns get a harmless clamped value)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - new:]


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences (token lists or strings)."""
    if len(a) <= len(b) and b[:len(a)] == a:   # the usual cases: b extends a, or a extends b
        return len(a)
    if len(b) < len(a) and a[:len(b)] == b:
        return len(b)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of all sequences."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        n = common_prefix(first[:n], s)
    return n


def chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
