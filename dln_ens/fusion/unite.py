"""``unite``: UniTE (Yao et al. 2024, "Determine-Then-Ensemble: Necessity of Top-k Union for
Large Language Model Ensembling"), over the main member's vocabulary.

Per row: U = the union of every member's top-k next tokens, as surfaces; each surface is carried
into each member's vocabulary (`carry`: by bytes, else the first token of the member's
tokenisation of it); member m's distribution over U is the softmax of its logits at the carried
ids (as the reference does: a token carried onto an id twice counts twice); the fused
probability of a surface is sum_m w_m p_m(u); the chosen main token is the one carrying the
winning surface, and its text extends the shared sequence (every other member re-tokenises).

Left out of the reference: its per-model special cases (ids of a lone space per model family),
and its logit 0 for a second union token carried onto an already used id. Added, so that
``score`` stays finite: main tokens outside U keep the main member's weighted probability
w_main p_main before the row is renormalised.

Cost per step: one top-k per member, |U| <= N k gathers per member and row, and (first time a
surface is seen, then cached) one tokenisation per member and surface missing from its vocabulary.
"""
from __future__ import annotations

import torch

from dln_ens.fusion.carry import CandidateFusion, onto_main


class UniteFusion(CandidateFusion):
    name = "unite"

    def __call__(self, logits, step=None):
        z, w, floor, union = self.candidates(logits, step)
        main_ids, fused = [], []
        for b, keys in enumerate(union):
            p = torch.zeros(len(keys), device=self.device)
            for i, n in enumerate(self.names):
                ids = [self.carrier.carry(n, key, z[n][b]) for key in keys]
                at = [j for j, x in enumerate(ids) if x is not None]
                if at:
                    cols = torch.tensor([ids[j] for j in at], device=self.device)
                    p[at] += w[b, i] * torch.softmax(z[n][b, cols], -1)
            main_ids.append([self.carrier.carry(self.main, key, z[self.main][b]) for key in keys])
            fused.append(p)
        return onto_main(floor, main_ids, fused)
