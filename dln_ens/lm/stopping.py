"""Text-level pieces of generation: stop strings, continuation text, per-sequence seeds."""
from __future__ import annotations

import hashlib
from typing import Sequence


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Index where the earliest occurrence of any stop string starts, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    i = first_stop(text, stop)
    return text if i < 0 else text[:i]


def continuation_texts(tokenizer, tails: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]) -> list[str]:
    """Text added by ``generated`` after a prompt ending with ``tails``.

    Decoding the new ids alone loses text that depends on what precedes them (SentencePiece
    drops the leading space of a sequence's first piece: "▁Yes" alone decodes to "Yes"), so
    decode tail + new and strip the tail's own decoding; fall back to the new ids alone when
    the tail's text is not a prefix (e.g. it ends inside a multi-byte character).
    """
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    heads = tokenizer.batch_decode([list(t) for t in tails], **kw)
    wholes = tokenizer.batch_decode([list(t) + list(g) for t, g in zip(tails, generated)], **kw)
    out = []
    for head, whole, gen in zip(heads, wholes, generated):
        out.append(whole[len(head):] if whole.startswith(head) else tokenizer.decode(list(gen), **kw))
    return out


def sequence_seeds(seed: int, prompts: Sequence[str]) -> list[int]:
    """One seed per sequence from (seed, prompt text, how many times that prompt came before in
    the call): a prompt samples the same text whatever it is batched with, and repeated prompts
    (several samples of one prompt) still get different draws."""
    seen: dict[str, int] = {}
    seeds = []
    for p in prompts:
        k = seen.get(p, 0)
        seen[p] = k + 1
        digest = hashlib.sha256(f"{seed}\x00{k}\x00{p}".encode()).digest()
        seeds.append(int.from_bytes(digest[:8], "little") >> 1)
    return seeds
