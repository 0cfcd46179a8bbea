"""One batch's decoding state across the members of an `EnsembleLanguageModel`.

The members the fusion reads each decode through their own `lm.decoder.DecodeState`; the text
is shared. Per step (DESIGN "Fusion per decoding step"): ``fused`` maps the members' next-token
logits to one distribution over the main vocabulary, the caller picks (or is given) a main
token per row, ``append`` extends each row's text by that token's surface bytes, the main member
steps with the id, and every other member re-tokenises the visible text (`align.update_many`,
one batched tokenizer call per member) and advances past the tokens it kept.
"""
from __future__ import annotations

import torch

from dln_ens.ensemble.align import TokenTrack, encode_with_offsets, update_many, visible_text
from dln_ens.fusion.base import StepContext
from dln_ens.lm.context import ContextLengthError
from dln_ens.lm.decoder import DecodeState


class EnsembleState:
    """``rows``: the original index of each live row (finished rows leave with ``keep_rows``)."""

    def __init__(self, ens, texts: list[str], main_ids: list[list[int]]):
        self.ens, self.texts = ens, texts
        self.rows = list(range(len(texts)))
        self.text = [t.encode("utf-8") for t in texts]   # prompt + appended tokens' bytes, per live row
        self.tracks = {}
        for n in ens.others:   # one batched tokenizer call per member
            tok = ens.members[n].tokenizer
            self.tracks[n] = [TokenTrack(tok, t, window=ens.window, verify=ens.verify_alignment, name=n, encoding=e)
                              for t, e in zip(texts, encode_with_offsets(tok, texts, True))]
            for t, tr in zip(texts, self.tracks[n]):
                if not tr.ids:
                    raise ValueError(f"member {n!r} encodes the context {t[:40]!r} to no tokens; "
                                     f"give a non-empty context")
        nll = ens.fusion.weighting.needs_prompt_nll
        self.lanes = {ens.main: DecodeState(ens.main_member, main_ids, nll)}
        for n, tracks in self.tracks.items():
            self.lanes[n] = DecodeState(ens.members[n], [tr.ids for tr in tracks], nll)
        if nll:   # per byte: members tokenise differently
            nbytes = torch.tensor([max(len(t), 1) for t in self.text], dtype=torch.float32)
            for lane in self.lanes.values():
                lane.prompt_nll = lane.prompt_nll / nbytes.to(lane.prompt_nll.device)

    def fused(self) -> torch.Tensor:
        """[B, V_main] fused log-probabilities of each live row's next token."""
        step = None
        if self.ens.fusion.needs_step():
            lanes = self.lanes
            step = StepContext(score=lambda n, rows, seqs: lanes[n].continuation_logprobs(rows, seqs),
                               prompt_nll={n: lane.prompt_nll for n, lane in lanes.items()})
        return self.ens.fusion({n: lane.logits for n, lane in self.lanes.items()}, step)

    def keep_rows(self, live: list[int]) -> None:
        """Keep only the live rows at positions ``live``."""
        for lane in self.lanes.values():
            lane.select(live)
        for n in self.tracks:
            self.tracks[n] = [self.tracks[n][i] for i in live]
        self.rows = [self.rows[i] for i in live]
        self.text = [self.text[i] for i in live]

    def append(self, tokens: list[int]) -> None:
        """Extend every live row by one main-vocabulary token."""
        main = self.lanes[self.ens.main]
        main.step(torch.tensor(tokens, device=main.mask.device))
        self.text = [x + (self.ens.surfaces[t] or b"") for x, t in zip(self.text, tokens)]
        if not self.tracks:
            return
        shown = [visible_text(x) for x in self.text]
        for n, tracks in self.tracks.items():
            olds = [len(tr.ids) for tr in tracks]
            keep = update_many(tracks, shown)
            limit = getattr(self.ens.members[n], "context_limit", None)
            for b, tr in enumerate(tracks):
                if limit is not None and len(tr.ids) > limit:   # its tokens grew faster than the main's
                    raise ContextLengthError(n, self.rows[b], len(tr.ids), limit,
                                             "the prompt + the text generated so far", text=self.texts[self.rows[b]])
                if keep[b] < olds[b] and keep[b] == len(tr.ids):   # rolled back to a shorter sequence:
                    keep[b] -= 1                                   # re-feed its last token
            self.lanes[n].advance(keep, [tr.ids[k:] for tr, k in zip(tracks, keep)])
