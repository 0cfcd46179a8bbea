"""Where each member's distribution after every target prefix is read, for the one-pass score.

Teacher-forcing a target under an ensemble needs, for every main-token prefix of the target,
each member's next-token distribution after exactly that text, the member's ids being its
tokenizer applied to the whole text (as in generation, `align.TokenTrack`). For pair i with
prefix texts p_0 ⊂ ... ⊂ p_{T-1}, the member runs one sequence, F = tokenizer(p_{T-1}), and
reads the logits of a prefix p_t off F wherever tokenizer(p_t) is a prefix of F (the
distribution of a causal model after those ids is then the same); only the other prefixes
become sequences of their own, tokenizer(p_t). tokenizer(p_t) is computed from F's
tokenisation by `align.update_many` (bounded tails, batched tokenizer calls), so the rule is
exactly the one generation uses: one-pass and exact scores differ only by float rounding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Hashable

from dln_ens.ensemble.align import TokenTrack, encode_with_offsets, update_many, visible_text


@dataclass
class Reads:
    """What one member runs (`lm.forced.logit_rows` arguments, ``order`` putting the rows in
    prefix order: pair by pair, t = 0 .. T-1)."""
    seqs: list[list[int]]
    groups: list[Hashable]
    wanted: list[list[int]]
    order: list[int]
    exact: int            # prefixes that needed a sequence of their own


def prefix_texts(context: str, pieces: list[bytes]) -> list[str]:
    """The text each member sees before target token t (t = 0 .. T-1): the context and the
    surface bytes of the target's first t tokens, an incomplete trailing character held back."""
    data, out = context.encode("utf-8"), []
    for piece in pieces:
        out.append(visible_text(data))
        data += piece
    return out


def member_reads(tokenizer, prefixes: list[list[str]], groups: list[Hashable], *, window: int = 4,
                 verify: bool = False, name: str = "member") -> Reads:
    """``prefixes[i]``: pair i's prefix texts (each a prefix of the last); ``groups[i]``: the
    key its sequences share a stem (KV cache) under, e.g. its context."""
    lasts = [p[-1] for p in prefixes]
    encs = encode_with_offsets(tokenizer, lasts, True)
    seqs = [ids for ids, _ in encs]
    grp, wanted = list(groups), [[] for _ in prefixes]
    tracks, texts, owner = [], [], []
    for i, ps in enumerate(prefixes):
        base = TokenTrack(tokenizer, lasts[i], window=window, verify=verify, name=name, encoding=encs[i])
        for t in range(len(ps) - 1):
            tracks.append(copy.copy(base))   # updates replace ids/offsets, never mutate them
            texts.append(ps[t])
            owner.append((i, t))
    update_many(tracks, texts)
    where: dict[tuple[int, int], tuple[int, int]] = {}
    exact = 0
    for tr, (i, t) in zip(tracks, owner):
        ids = tr.ids
        if not ids:
            _no_tokens(name, prefixes[i][t])
        if len(ids) <= len(seqs[i]) and seqs[i][:len(ids)] == ids:
            where[i, t] = (i, len(wanted[i]))
            wanted[i].append(len(ids) - 1)
        else:
            where[i, t] = (len(seqs), 0)
            seqs.append(ids)
            grp.append(groups[i])
            wanted.append([len(ids) - 1])
            exact += 1
    for i, ps in enumerate(prefixes):
        if not seqs[i]:
            _no_tokens(name, ps[-1])
        where[i, len(ps) - 1] = (i, len(wanted[i]))
        wanted[i].append(len(seqs[i]) - 1)
    starts = [0]
    for w in wanted:
        starts.append(starts[-1] + len(w))
    order = [0] * len(where)
    for k, (i, t) in enumerate((i, t) for i, ps in enumerate(prefixes) for t in range(len(ps))):
        order[starts[where[i, t][0]] + where[i, t][1]] = k
    return Reads(seqs, grp, wanted, order, exact)


def _no_tokens(name: str, text: str):
    raise ValueError(f"member {name!r} encodes the context {text[:40]!r} to no tokens; give a non-empty context")
