"""The one protocol every backend implements (compare lm-evaluation-harness' ``LM``).

Everything above the backends (DLN layers, evaluation, the trainer) talks only to this.
A user can plug in an API model or a scripted fake by implementing these three methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Generation:
    text: str
    logprob: float  # sum of the log-probabilities of the generated tokens
    num_tokens: int


@dataclass(frozen=True)
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

    def next_token_logprobs(self, contexts: list[str], candidates: list[str], *,
                            aggregate: str = "max") -> np.ndarray:
        """(len(contexts), len(candidates)) log-probability of each candidate as the next
        piece of text: the first tokens of its forms (each alternative of "a|A", with and
        without a leading space), combined by ``aggregate``: "max" the largest log-prob, "sum"
        the total probability of the distinct tokens (`lm.candidates`). A backend without the
        keyword still serves "max" class scoring (``"space_variants": "max"``); "sum" refuses
        it by name (`scoring.require_aggregate`)."""
        ...


# What an ensemble member must expose beyond `LanguageModel` (`HFLanguageModel` and
# `DepthEnsembleLanguageModel` do): its tokenizer and vocabulary, and raw batched forwards that
# return logits and a KV cache, so the ensemble can step every member on its own cache.
LOCAL_MEMBER_METHODS = ("encode", "encode_many", "nonempty", "split_pairs_with_text", "forward", "last_logits")
LOCAL_MEMBER_ATTRIBUTES = ("tokenizer", "vocab_size", "device", "pad_token_id", "stop_token_ids")


@runtime_checkable
class LocalMember(LanguageModel, Protocol):
    """A local model an `EnsembleLanguageModel` can fuse (see `HFLanguageModel` for the meaning
    of each part). Checked at config time (`missing_member_parts` on the class) and when an
    ensemble is built (on the instance)."""
    tokenizer: object
    vocab_size: int
    device: object
    pad_token_id: int
    stop_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...
    def encode_many(self, texts: Sequence[str]) -> list[list[int]]: ...
    def nonempty(self, ids: list[int]) -> list[int]: ...
    def split_pairs_with_text(self, contexts: Sequence[str], targets: Sequence[str]) -> list: ...
    def forward(self, input_ids, attention_mask, past_key_values=None, position_ids=None): ...
    def last_logits(self, ids, mask, cache, pos): ...


def missing_member_parts(obj, attributes: bool = True) -> list[str]:
    """The `LocalMember` parts ``obj`` (an instance, or a class when ``attributes`` is False)
    lacks."""
    missing = [m for m in LOCAL_MEMBER_METHODS if not callable(getattr(obj, m, None))]
    if attributes:
        missing += [a for a in LOCAL_MEMBER_ATTRIBUTES if getattr(obj, a, None) is None]
    return missing
