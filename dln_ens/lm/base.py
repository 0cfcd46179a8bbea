"""The one protocol every backend implements (compare lm-evaluation-harness' ``LM``).

Everything above the backends (DLN layers, evaluation, the trainer) talks only to this.
A user can plug in an API model or a scripted fake by implementing these three methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class Generation:
    text: str
    logprob: float  # sum of the log-probabilities of the generated tokens
    num_tokens: int


@dataclass
class Score:
    logprob: float  # log p(target | context), summed over the target's tokens
    num_tokens: int


@runtime_checkable
class LanguageModel(Protocol):
    name: str

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[Generation]:
        """Continue each prompt. Stops at the first stop string (excluded from ``text``),
        EOS or ``max_new_tokens``. Temperature 0 is greedy; ``seed`` makes sampling repeatable."""
        ...

    def score(self, contexts: list[str], targets: list[str]) -> list[Score]:
        """Teacher-forced log-likelihood of each target after its context."""
        ...

    def next_token_logprobs(self, contexts: list[str], candidates: list[str]) -> np.ndarray:
        """(len(contexts), len(candidates)) log-probability of each candidate as the next
        piece of text (its first token, with and without a leading space)."""
        ...
