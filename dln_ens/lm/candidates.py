"""Class candidates as the next piece of text (the DLN scorer's verbalizers): which first token
stands for " cand" / "cand" after a context, and the candidate's log-probability read off a
next-token distribution. Shared by the local backends and the OpenAI-compatible client."""
from __future__ import annotations

import numpy as np
import torch


def check_candidates(candidates: list[str]) -> None:
    if any(not c.strip() for c in candidates):
        raise ValueError(f"candidates must be non-blank strings, got {candidates!r}")


def candidate_logprobs(tokenizing_lm, dist: torch.Tensor, contexts: list[str],
                       candidates: list[str]) -> np.ndarray:
    """Log-probability of each candidate as the next piece of text, read off ``dist`` (the
    [B, V] next-token log-probs after each context, over ``tokenizing_lm``'s vocabulary).

    As the DLN scorer does, a candidate counts with and without a leading space: its variants
    " cand" and "cand" are tokenised after the context (first token of encode(context +
    variant) beyond encode(context); the variant encoded alone if the context's tokens are not
    a prefix) and the candidate gets the max over the two first tokens' log-probs.
    """
    check_candidates(candidates)
    first = candidate_first_tokens(tokenizing_lm, contexts, candidates)
    lp = dist.gather(1, first).view(len(contexts), len(candidates), 2)
    return lp.max(-1).values.numpy()


def candidate_variants(candidates: list[str]) -> list[str]:
    """" cand" and "cand" for each candidate, in that order (a leading space counts once)."""
    bases = [c[1:] if c.startswith(" ") else c for c in candidates]
    return [v for b in bases for v in (" " + b, b)]


def candidate_first_tokens(lm, contexts: list[str], candidates: list[str]) -> torch.Tensor:
    """[len(contexts), 2 * len(candidates)] the first token of " cand" and "cand" after each
    context (columns: candidate 0 with space, without, candidate 1 ...; see `candidate_logprobs`)."""
    variants = candidate_variants(candidates)
    ctxs = lm.encode_many(contexts)
    wholes = lm.encode_many([x + v for x in contexts for v in variants])
    alone = [lm.tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in variants]
    first = torch.empty((len(contexts), len(variants)), dtype=torch.long)
    for i, ctx in enumerate(ctxs):
        for j in range(len(variants)):
            whole = wholes[i * len(variants) + j]
            prefix_ok = whole[:len(ctx)] == ctx and len(whole) > len(ctx)
            first[i, j] = whole[len(ctx)] if prefix_ok else alone[j]
    return first
