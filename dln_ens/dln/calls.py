"""Wrappers around any `LanguageModel` for accounting: how many backend calls, requests and
tokens a DLN step costs and how long they take (`CountingLM`), and the same work sent one
request at a time (`OneAtATimeLM`), the baseline that batching and shared-prefix reuse are
measured against."""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from dln_ens.lm.base import LanguageModel

METHODS = ("generate", "score", "next_token_logprobs")


def token_encoder(lm):
    """The batch tokenizer of a local backend (an ensemble: its main member's; a MoD member:
    its base model's; a wrapper's: its inner backend's), or None (then token counts are not
    available)."""
    while lm is not None:   # through wrappers (`distributed.ShardedLanguageModel`) to the model
        for obj in (lm, getattr(lm, "main_member", None), getattr(lm, "base", None)):
            if obj is not None and callable(getattr(obj, "encode_many", None)):
                return obj.encode_many
        lm = getattr(lm, "inner", None)
    return None


class CountingLM:
    """Counts, per method, calls, requests and seconds, and the tokens sent to the backend as the
    DLN reference's COST counts them (an API's usage): ``prompt`` = the tokens of every prompt /
    context and of every scored target, ``completion`` = the generated tokens."""

    def __init__(self, inner: LanguageModel):
        self.inner = inner
        self.name = inner.name
        self.calls: dict[str, int] = defaultdict(int)
        self.requests: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._encode = token_encoder(inner)
        self.tokens: dict[str, int] | None = {"prompt": 0, "completion": 0} if self._encode else None

    def _count(self, texts: list[str], completion: int = 0) -> None:
        if self.tokens is not None:
            self.tokens["prompt"] += sum(len(ids) for ids in self._encode(texts)) if texts else 0
            self.tokens["completion"] += completion

    def _timed(self, method: str, n: int, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[method] += time.perf_counter() - t0
        self.calls[method] += 1
        self.requests[method] += n
        return out

    def generate(self, prompts, **kwargs):
        out = self._timed("generate", len(prompts), self.inner.generate, prompts, **kwargs)
        self._count(list(prompts), sum(int(g.num_tokens) for g in out))
        return out

    def score(self, contexts, targets):
        out = self._timed("score", len(contexts), self.inner.score, contexts, targets)
        self._count(list(contexts))
        if self.tokens is not None:
            self.tokens["prompt"] += sum(int(s.num_tokens) for s in out)
        return out

    def next_token_logprobs(self, contexts, candidates, **kwargs):
        out = self._timed("next_token_logprobs", len(contexts), self.inner.next_token_logprobs,
                          contexts, candidates, **kwargs)
        self._count(list(contexts))
        return out

    def snapshot(self) -> dict:
        return {m: {"calls": self.calls[m], "requests": self.requests[m],
                    "seconds": round(self.seconds[m], 4)} for m in METHODS}

    def token_snapshot(self) -> dict | None:
        return None if self.tokens is None else {**self.tokens, "total": sum(self.tokens.values())}


def diff_snapshots(after: dict, before: dict) -> dict:
    return {m: {k: round(after[m][k] - before[m][k], 4) for k in after[m]} for m in after}


class OneAtATimeLM:
    """Sends every request of a batched call as its own call (no batching, no shared-prefix
    reuse). A seeded sampled generate call is split with the same seed per request, so its
    samples differ from the batched call's; greedy calls and scores are comparable."""

    def __init__(self, inner: LanguageModel):
        self.inner = inner
        self.name = inner.name

    def generate(self, prompts, **kwargs):
        return [self.inner.generate([p], **kwargs)[0] for p in prompts]

    def score(self, contexts, targets):
        return [self.inner.score([c], [t])[0] for c, t in zip(contexts, targets)]

    def next_token_logprobs(self, contexts, candidates, **kwargs):
        if not contexts:
            return np.zeros((0, len(candidates)))
        return np.concatenate([np.asarray(self.inner.next_token_logprobs([c], candidates, **kwargs))
                               for c in contexts])
