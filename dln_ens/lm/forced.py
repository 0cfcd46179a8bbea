"""Batched forwards over known token sequences: the prefill of a decoder, and teacher forcing.

Only the `LocalMember` parts of a model are used (``last_logits``, ``forward``,
``pad_token_id``, ``device``), so `HFLanguageModel`, Mixture-of-Depths members and the
ensemble's one-pass score share this code. Layouts are those of `lm.batching`: masks may have
holes, position ids count real tokens, and no row's result depends on the rows beside it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from dln_ens.lm.batching import common_prefix, common_prefix_len, pad, positions


def prefill(member, seqs: Sequence[Sequence[int]]):
    """Run non-empty token-id lists as one batch; their common prefix is computed once (its KV
    cache repeated over the batch), then each row's remaining tokens left-padded after it.
    Returns next-token logits [B, V] float32, the KV cache and the attention mask [B, S]."""
    b = len(seqs)
    shared = min(common_prefix_len(seqs), min(map(len, seqs)) - 1) if b > 1 else 0
    cache = None
    if shared > 0:
        prefix = torch.tensor([list(seqs[0][:shared])], device=member.device)
        ones = torch.ones_like(prefix)
        _, cache = member.last_logits(prefix, ones, None, positions(ones, shared))
        cache.batch_repeat_interleave(b)
    ids, rest_mask = pad([s[shared:] for s in seqs], member.pad_token_id, "left", member.device)
    mask = torch.cat([rest_mask.new_ones((b, shared)), rest_mask], 1)
    logits, cache = member.last_logits(ids, mask, cache, positions(mask, ids.shape[1]))
    return logits, cache, mask


@torch.inference_mode()
def logits_at(member, seqs: Sequence[Sequence[int]], groups: Sequence[Hashable],
              wanted: Sequence[Sequence[int]], order: Sequence[int] | None = None) -> torch.Tensor:
    """Teacher forcing: the next-token logits after position j of ``seqs[i]`` (i.e. the logits
    of ``seqs[i][:j + 1]``) for every j in ``wanted[i]``, stacked in that order: [sum of
    len(wanted[i]), V] float32; with ``order``, the k-th of them goes to row ``order[k]``.
    `logit_rows`, copied into one tensor."""
    return logit_rows(member, seqs, groups, wanted, order).take()


@dataclass
class LogitRows:
    """Rows of logits left where the forwards wrote them: row k is ``sources[src[k]][row[k]]``.
    ``take(a, b)`` copies rows a..b-1 into one [b - a, V] tensor, so a reader going by blocks
    (the ensemble's fusion) never makes a copy of all of them: for three members of 32k-65k
    ids and a few hundred positions that copy was 100+ MB of fresh pages per batch; a member's own
    score reads them by blocks too (`summed_logprobs`). The sources
    (a forward's logits over every position of its padded rows) stay alive as long as this
    object; a row that is a view into a larger tensor is copied when placed (`_place`)."""
    sources: list[torch.Tensor]
    src: list[int]
    row: list[int]

    def __len__(self) -> int:
        return len(self.src)

    def take(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        b = len(self) if b is None else min(b, len(self))
        if not 0 <= a <= b:
            raise IndexError(f"rows {a}..{b} of {len(self)}")
        first = self.sources[0]
        out = torch.empty((b - a, first.shape[-1]), dtype=first.dtype, device=first.device)
        k = a
        while k < b:   # one slice copy per run of consecutive rows of one source
            s, r, n = self.src[k], self.row[k], 1
            while k + n < b and self.src[k + n] == s and self.row[k + n] == r + n:
                n += 1
            out[k - a:k - a + n].copy_(self.sources[s][r:r + n])
            k += n
        return out


@torch.inference_mode()
def logit_rows(member, seqs: Sequence[Sequence[int]], groups: Sequence[Hashable],
               wanted: Sequence[Sequence[int]], order: Sequence[int] | None = None) -> LogitRows:
    """`logits_at`'s rows, as `LogitRows`.

    Sequences with the same ``groups`` key (e.g. one context with several targets) share a
    *stem*, their common prefix up to their first wanted position, which runs once (`prefill`);
    each sequence's rest then runs after a copy of its stem's cache: right-padded with every
    position's logits, or, when only its last token's logits are wanted, left-padded with those
    alone (``last_logits``: no LM head over the other positions)."""
    groups = list(groups)
    for key in dict.fromkeys(groups):   # a group without a common first token: each row alone
        rows = [i for i, g in enumerate(groups) if g == key]
        if common_prefix_len([seqs[i] for i in rows]) == 0:
            for i in rows:
                groups[i] = (key, i)
    keys = list(dict.fromkeys(groups))
    stem_of = {k: s for s, k in enumerate(keys)}
    stem_len = {}
    for key in keys:
        rows = [i for i, g in enumerate(groups) if g == key]
        cut = min(min(wanted[i]) + 1 for i in rows)
        stem_len[key] = min(common_prefix_len([seqs[i] for i in rows]), cut)
    starts = [0]
    for w in wanted:
        starts.append(starts[-1] + len(w))
    place = list(range(starts[-1])) if order is None else list(order)

    stem_logits, cache, mask = prefill(member, [list(seqs[groups.index(k)][:stem_len[k]]) for k in keys])
    out = LogitRows([], [-1] * starts[-1], [-1] * starts[-1])
    full, last = [], []   # rows whose rest runs, by layout
    dst, src = [], []     # positions read off their stem's last logits
    for i, g in enumerate(groups):
        for k, j in enumerate(wanted[i]):
            if j == stem_len[g] - 1:
                dst.append(place[starts[i] + k])
                src.append(stem_of[g])
        if max(wanted[i]) >= stem_len[g]:
            (last if set(wanted[i]) == {len(seqs[i]) - 1} else full).append(i)
    _place(out, dst, stem_logits, src)
    lens = [max(wanted[i]) + 1 for i in full]   # tokens of each full row in its cache
    branch = _branches(seqs, groups, stem_len, full, lens, last)
    last = [i for i in last if i not in branch]
    if last:
        c = copy.deepcopy(cache) if full else cache
        logits, _, _ = _run_rests(member, c, mask, [stem_of[groups[i]] for i in last],
                                  [seqs[i][stem_len[groups[i]]:] for i in last], last_only=True)
        _place(out, [place[starts[i] + len(wanted[i]) - 1] for i in last], logits, list(range(len(last))))
    if full:
        stem_width = mask.shape[1]
        logits, cache, mask = _run_rests(member, cache, mask, [stem_of[groups[i]] for i in full],
                                         [seqs[i][stem_len[groups[i]]:n] for i, n in zip(full, lens)], last_only=False)
        width = logits.shape[1]
        dst, src = [], []
        for r, i in enumerate(full):
            for k, j in enumerate(wanted[i]):
                if j >= stem_len[groups[i]]:
                    dst.append(place[starts[i] + k])
                    src.append(r * width + j - stem_len[groups[i]])
        _place(out, dst, logits.reshape(-1, logits.shape[-1]), src)
    if branch:
        rows = list(branch)
        logits = _run_branches(member, cache, mask, stem_width, [branch[i] for i in rows], [seqs[i] for i in rows],
                               [stem_len[groups[i]] for i in rows])
        _place(out, [place[starts[i] + len(wanted[i]) - 1] for i in rows], logits, list(range(len(rows))))
    assert -1 not in out.src, "a wanted position was not computed"
    return out


def _branches(seqs, groups, stem_len: dict, full: list[int], lens: list[int], last: list[int]) -> dict:
    """{last-only row i: (r, L)}: the full row r (index into ``full``) of i's group sharing the
    longest prefix with it, L tokens (at most len(seqs[i]) - 1, so i feeds at least one token),
    where that is longer than the group's stem. Row i then runs only its tokens after L, on top
    of r's cache (e.g. a prefix whose tokenisation differs from the whole text's in its last
    tokens), instead of all of its tokens after the stem."""
    by_group: dict = {}
    for r, (i, n) in enumerate(zip(full, lens)):
        by_group.setdefault(groups[i], []).append((r, seqs[i][:n]))
    out = {}
    for i in last:
        g, s = groups[i], seqs[i]
        best = (None, stem_len[g])
        for r, f in by_group.get(g, []):
            L = min(common_prefix(s, f), len(s) - 1)
            if L > best[1]:
                best = (r, L)
        if best[0] is not None:
            out[i] = best
    return out


def _run_branches(member, cache, mask: torch.Tensor, stem_width: int, parts: list[tuple[int, int]],
                  seqs: list[list[int]], stems: list[int]) -> torch.Tensor:
    """Last-position logits [R, V] of ``seqs[k]`` run as its first L tokens, read from row r of
    the full rows' ``cache`` (its mask [F, stem_width + W]: the stem's columns, then the row's
    right-padded rest; the columns after those L tokens are masked out), plus its tokens after
    L (``parts[k] = (r, L)``, ``stems[k]``: its stem's length; the cache is consumed)."""
    sel = torch.tensor([r for r, _ in parts], device=mask.device)
    cache.batch_select_indices(sel)
    past = mask[sel].clone()
    for k, ((_, L), stem) in enumerate(zip(parts, stems)):
        past[k, stem_width + L - stem:] = 0   # the full row's rest after its first L tokens
    ids, block = pad([s[L:] for s, (_, L) in zip(seqs, parts)], member.pad_token_id, "left", member.device)
    m = torch.cat([past, block.to(mask.device)], 1)
    return member.last_logits(ids, m, cache, positions(m, ids.shape[1]))[0]


def _run_rests(member, cache, mask: torch.Tensor, stems: list[int], rests: list[list[int]], last_only: bool):
    """Each rest after its stem's cache row (``cache`` is consumed): the last position's logits
    [R, V] of left-padded rests, or every position's [R, W, V] of right-padded ones; with the
    updated cache and its attention mask [R, S + W]."""
    sel = torch.tensor(stems, device=mask.device)
    cache.batch_select_indices(sel)
    ids, block = pad(rests, member.pad_token_id, "left" if last_only else "right", member.device)
    m = torch.cat([mask[sel], block.to(mask.device)], 1)
    if last_only:
        logits, cache = member.last_logits(ids, m, cache, positions(m, ids.shape[1]))
    else:
        logits, cache = member.forward(ids, m, cache, positions(m, ids.shape[1]))
    return logits, cache, m


def _place(out: LogitRows, dst: list[int], src: torch.Tensor, rows: list[int]) -> None:
    """Rows ``dst[k]`` of ``out`` are row ``rows[k]`` of ``src`` (added as a source; copied if it
    is a view into a larger tensor, e.g. a model's last-position logits sliced from every
    position's, which would otherwise stay alive)."""
    if src.untyped_storage().nbytes() > src.numel() * src.element_size():
        src = src.clone()
    out.sources.append(src)
    for d, r in zip(dst, rows):
        out.src[d] = len(out.sources) - 1
        out.row[d] = r


SCORE_ROWS = 256   # positions per log-softmax of `summed_logprobs` (bounds its [rows, V] temporaries)


def summed_logprobs(logits: LogitRows, targets: Sequence[Sequence[int]]) -> list[float]:
    """Per target, the sum of log_softmax(logits) at its tokens; ``logits`` holds the targets'
    positions one after the other. Read SCORE_ROWS rows at a time: no [positions, V] copy or
    log-softmax of all of them (GBs for long targets over a 100k+ vocabulary)."""
    first = logits.sources[0]
    flat = torch.tensor([t for tgt in targets for t in tgt], device=first.device)
    lp = torch.empty(len(flat), dtype=first.dtype, device=first.device)
    for a in range(0, len(flat), SCORE_ROWS):
        block = torch.log_softmax(logits.take(a, a + SCORE_ROWS), -1)
        lp[a:a + len(block)] = block.gather(1, flat[a:a + SCORE_ROWS, None])[:, 0]
    return per_target_sums(lp, targets)


def per_target_sums(lp: torch.Tensor, targets: Sequence[Sequence[int]]) -> list[float]:
    """Per target, the sum of its tokens' entries of ``lp`` [sum of lengths] (targets one after
    the other)."""
    seg = torch.repeat_interleave(torch.arange(len(targets), device=lp.device),
                                  torch.tensor([len(t) for t in targets], device=lp.device))
    return torch.zeros(len(targets), dtype=lp.dtype, device=lp.device).index_add(0, seg, lp).tolist()
