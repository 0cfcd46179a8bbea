"""Sampling shared by every local decoder: one seed and one random stream per sequence, so a
sequence's sample does not depend on the batch it lands in."""
from __future__ import annotations

from typing import Sequence

import torch

from dln_ens.checks import check_number
from dln_ens.lm.stopping import sequence_seeds


def sampling_seeds(temperature: float, seed: int | None, keys: Sequence[str]) -> list[int | None]:
    """One seed per sequence (``stopping.sequence_seeds`` keyed by ``keys``); all None when
    greedy. Without ``seed`` a random one is drawn, so sampling still follows torch.manual_seed."""
    check_number("temperature", temperature, ge=0)
    if temperature == 0:
        return [None] * len(keys)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()).item())
    return sequence_seeds(seed, keys)


def pick_tokens(logits: torch.Tensor, temperature: float, gens) -> torch.Tensor:
    """[B] next tokens: argmax at temperature 0, else sampled from softmax(logits / temperature)
    with row b drawing from its own generator ``gens[b]``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    # one random stream per sequence; no batched sampler takes several generators
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)])
