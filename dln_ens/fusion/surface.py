"""``surface``: members agree on *text*, not on tokens (no published system does this).

Per row: candidates C = the union of every member's top-k next tokens, as surfaces (`carry`).
Each member m gives each candidate c the probability of c's *text* under its own tokenisation:
if c is one of its tokens, that token's probability now (the more probable one when it has the
bytes twice); else the tokens t_1..t_L of c as a continuation of running text
(``FusionSetup.continuation``), scored after the member's current sequence,
P_m(c) = prod_l p_m(t_l | ..., t_<l). A member that
splits " Paris" into " " + "Paris" (WordPiece-style) or into several pieces is scored over all
of them, so it agrees with a member that has " Paris" as one token. The fused score of c is
sum_m w_m P_m(c); it goes to the main token that carries c (its surface, else its first token
in the main tokenisation), the best candidate's when several share one; main tokens outside C
keep w_main p_main; the row is renormalised. With one member and candidates that tokenise to
themselves this is the member's own distribution on its top-k.

Approximation: a candidate is tokenised on its own (as if it started a new pre-token), not merged
with the context's last characters; a mid-word candidate is scored on that tokenisation.

Cost per step, per member: one batched forward over every (row, candidate) pair whose text is
more than one of its tokens, feeding L - 1 tokens (L = the candidate's length in that member's
tokens, at most a few) on a copy of the row's KV cache: B |C| pairs, |C| <= N k. Compute: about
B |C| (L - 1) token positions attending to the cache, i.e. |C| (L - 1) times one decoding step;
memory: the cache copied per pair (B |C| x the cache of one row) during that forward. Pairs of
one token read the step's logits and cost nothing more. Plus, once per surface, one tokenisation.
"""
from __future__ import annotations

import torch

from dln_ens.fusion.carry import CandidateFusion, onto_main


class SurfaceFusion(CandidateFusion):
    name = "surface"
    reads_continuations = True

    def __call__(self, logits, step=None):
        if step is None:
            raise ValueError("method 'surface' scores text under each member: it needs a StepContext")
        z, w, floor, union = self.candidates(logits, step)
        fused = [torch.zeros(len(keys), device=self.device) for keys in union]
        for i, n in enumerate(self.names):
            p_n = torch.softmax(z[n], -1)
            rows, seqs, where = [], [], []
            for b, keys in enumerate(union):
                for j, key in enumerate(keys):
                    one = self.carrier.single(n, key, z[n][b])
                    if one is not None:   # one of its tokens: read off this step's distribution
                        fused[b][j] += w[b, i] * p_n[b, one]
                    elif seq := self.carrier.ids(n, key):
                        rows.append(b)
                        seqs.append(seq)
                        where.append((b, j))
            if not rows:
                continue
            probs = step.score(n, rows, seqs).to(self.device).exp()
            for (b, j), p in zip(where, probs):
                fused[b][j] += w[b, i] * p
        main_ids = [[self.carrier.carry(self.main, key, z[self.main][b]) for key in keys]
                    for b, keys in enumerate(union)]
        return onto_main(floor, main_ids, fused)
