"""Request caching and class scoring over any `LanguageModel` (DLN layers and plain evaluation)."""
from __future__ import annotations

import numpy as np

from dln_ens.lm.base import LanguageModel


class CallCache:
    """Memo of scoring requests within one training step: a request already answered (e.g.
    the current prompt, scored once for the posterior weights and again as a candidate) is
    not sent twice. Kept per step, so results never depend on earlier iterations."""

    def __init__(self):
        self._score: dict[int, dict[tuple[str, str], tuple[float, int]]] = {}
        self._classes: dict[int, dict[tuple[str, tuple[str, ...]], np.ndarray]] = {}

    def score(self, lm: LanguageModel, contexts: list[str], targets: list[str]) -> list[tuple[float, int]]:
        memo = self._score.setdefault(id(lm), {})
        keys = list(zip(contexts, targets))
        todo = sorted({k for k in keys if k not in memo})
        if todo:
            out = lm.score([c for c, _ in todo], [t for _, t in todo])
            if len(out) != len(todo):
                raise RuntimeError(f"backend {lm.name!r}: score returned {len(out)} results for "
                                   f"{len(todo)} requests")
            for k, s in zip(todo, out):
                memo[k] = (float(s.logprob), int(s.num_tokens))
        return [memo[k] for k in keys]

    def next_token_logprobs(self, lm: LanguageModel, contexts: list[str], candidates: list[str]) -> np.ndarray:
        memo = self._classes.setdefault(id(lm), {})
        cands = tuple(candidates)
        todo = sorted({c for c in contexts if (c, cands) not in memo})
        if todo:
            out = np.asarray(lm.next_token_logprobs(todo, list(cands)), dtype=np.float64)
            if out.shape != (len(todo), len(cands)):
                raise RuntimeError(f"backend {lm.name!r}: next_token_logprobs returned shape "
                                   f"{out.shape}, expected {(len(todo), len(cands))}")
            for c, row in zip(todo, out):
                memo[(c, cands)] = row
        return np.stack([memo[(c, cands)] for c in contexts]) if contexts else np.zeros((0, len(cands)))


def verbalizers(cls: str) -> list[str]:
    """A class's verbalizer alternatives: "a|A" -> ["a", "A"] (the first is its prototype)."""
    return cls.split("|")


def class_scoring_mode(classes: list[str]) -> str:
    """"next_token" when the first characters of the classes' verbalizers tell the classes
    apart, else "full_string"."""
    firsts = [{v.lstrip()[:1] for v in verbalizers(c)} for c in classes]
    disjoint = all(not (a & b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
    return "next_token" if disjoint else "full_string"


def class_logprobs(lm: LanguageModel, contexts: list[str], classes: list[str],
                   cache: CallCache | None = None, aggregation: str = "sum") -> np.ndarray:
    """[N, C] unnormalised log-probabilities of the classes after each context: each
    verbalizer alternative of a class ("a|A") is scored and the class gets their sum
    (probabilities; the DLN reference's default) or their max.

    `next_token_logprobs` sees only a verbalizer's first token: when verbalizers of two classes
    start alike ("(A)", "(B)") it cannot tell them apart, so those tasks score whole strings."""
    if aggregation not in ("sum", "max"):
        raise ValueError(f"class aggregation must be 'sum' or 'max', got {aggregation!r}")
    cache = cache or CallCache()
    alts = [v for c in classes for v in verbalizers(c)]
    if class_scoring_mode(classes) == "next_token":
        lp = cache.next_token_logprobs(lm, contexts, alts)
    else:
        flat_c = [c for c in contexts for _ in alts]
        flat_t = [" " + v for _ in contexts for v in alts]
        out = cache.score(lm, flat_c, flat_t)
        lp = np.asarray([v for v, _ in out], dtype=np.float64).reshape(len(contexts), len(alts))
    if len(alts) == len(classes):
        return lp
    cols, start = [], 0
    for c in classes:
        part = lp[:, start:start + len(verbalizers(c))]
        start += part.shape[1]
        cols.append(np.logaddexp.reduce(part, axis=1) if aggregation == "sum" else part.max(axis=1))
    return np.stack(cols, axis=1)
