"""Class candidates as the next piece of text (the DLN scorer's verbalizers): which first token
stands for each form of a candidate after a context, and the candidate's log-probability read
off a next-token distribution. Shared by the local backends and the OpenAI-compatible client.

A candidate stands for several forms: each of its alternatives ("a|A": "a" and "A") with and
without a leading space (" a", "a", " A", "A"). Its log-probability combines the forms' first
tokens (``aggregate``):

- "max": the largest of their log-probs (the protocol's default).
- "sum": the log of their total probability, each distinct token counted once: when two forms
  start with the same token (SentencePiece tokenisers often give " a" and "a" the same first
  token "▁a"), that token's probability counts once. This is the DLN reference's sum
  (`dln/score.py`: a set of verbalizer strings, each matched to the one token with that text),
  stated over first tokens, so a candidate's probability never exceeds 1.
"""
from __future__ import annotations

import numpy as np
import torch

AGGREGATES = ("max", "sum")


def check_candidates(candidates: list[str], aggregate: str = "max") -> None:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if any(not a.strip() for c in candidates for a in c.split("|")):
        raise ValueError(f"candidates must be non-blank strings (alternatives \"a|A\" non-blank too), "
                         f"got {candidates!r}")


def candidate_forms(candidate: str) -> list[str]:
    """The texts a candidate stands for: " a", "a", " A", "A" for "a|A" (a leading space counts
    once; repeated forms once)."""
    bases = [a[1:] if a.startswith(" ") else a for a in candidate.split("|")]
    return list(dict.fromkeys(v for b in bases for v in (" " + b, b)))


def forms_of(candidates: list[str]) -> tuple[list[str], list[range]]:
    """Every candidate's forms in one flat list, and the columns of each candidate in it."""
    flat, spans = [], []
    for c in candidates:
        forms = candidate_forms(c)
        spans.append(range(len(flat), len(flat) + len(forms)))
        flat += forms
    return flat, spans


def aggregate_forms(keys: list[list], lps: np.ndarray, spans: list[range], aggregate: str) -> np.ndarray:
    """[N, C] candidate log-probs from [N, F] form log-probs ``lps``; ``keys[i][j]`` names the
    token form j starts with after context i (equal keys = the same token, counted once by
    "sum")."""
    out = np.empty((lps.shape[0], len(spans)), dtype=np.float64)
    for i in range(lps.shape[0]):
        for c, cols in enumerate(spans):
            if aggregate == "max":
                out[i, c] = max(lps[i, j] for j in cols)
            else:
                distinct = {keys[i][j]: lps[i, j] for j in cols}
                out[i, c] = np.logaddexp.reduce(np.asarray(list(distinct.values()), dtype=np.float64))
    return out


def candidate_logprobs(tokenizing_lm, dist: torch.Tensor, contexts: list[str], candidates: list[str],
                       aggregate: str = "max") -> np.ndarray:
    """Log-probability of each candidate as the next piece of text, read off ``dist`` (the
    [B, V] next-token log-probs after each context, over ``tokenizing_lm``'s vocabulary): each
    form's first token (see `form_first_tokens`), combined by ``aggregate`` (module docstring)."""
    check_candidates(candidates, aggregate)
    forms, spans = forms_of(candidates)
    first = form_first_tokens(tokenizing_lm, contexts, forms)
    lps = dist.gather(1, first).double().numpy()
    return aggregate_forms(first.tolist(), lps, spans, aggregate)


def form_first_tokens(lm, contexts: list[str], forms: list[str]) -> torch.Tensor:
    """[len(contexts), len(forms)] the first token of each form after each context: the first
    token of encode(context + form) beyond encode(context); the form encoded alone if the
    context's tokens are not a prefix."""
    ctxs = lm.encode_many(contexts)
    wholes = lm.encode_many([x + v for x in contexts for v in forms])
    alone = [lm.tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in forms]
    first = torch.empty((len(contexts), len(forms)), dtype=torch.long)
    for i, ctx in enumerate(ctxs):
        for j in range(len(forms)):
            whole = wholes[i * len(forms) + j]
            prefix_ok = whole[:len(ctx)] == ctx and len(whole) > len(ctx)
            first[i, j] = whole[len(ctx)] if prefix_ok else alone[j]
    return first
