"""``union``: in the spirit of UniTE / GaC, U = union of the members' top-k next tokens,
matched by surface bytes, kept when the main vocabulary has that surface. A main token with
surface s in U gets ``sum_m w_m p_m(s)`` (p_m(s) = member m's probability of its token with
surface s, 0 if it has none); a main token outside U keeps ``w_main p_main``, so no token
gets probability zero (scores stay finite); then renormalise."""
from __future__ import annotations

import torch

from dln_ens.fusion.base import Fusion, canonical_ids
from dln_ens.fusion.carry import TopkSettings


class UnionFusion(Fusion):
    name = "union"

    Settings = TopkSettings

    @classmethod
    def needs_vocab(cls, settings, num_members: int) -> bool:
        return num_members > 1

    def __init__(self, setup, settings):
        super().__init__(setup, settings)
        if len(self.names) > 1:
            self._build_maps({n: setup.vocab(n) for n in self.names})

    def _build_maps(self, vocabs):
        """member id -> main id with the same surface (-1: none), and main id -> member id."""
        mv = vocabs[self.main]
        main_index = canonical_ids(mv.surfaces, mv.tokens, len(mv.surfaces))
        self.to_main, self.from_main = {}, {}
        for n in self.names:
            v = vocabs[n]
            own = canonical_ids(v.surfaces, v.tokens, len(v.surfaces))
            to_main = torch.full((len(v.surfaces),), -1, dtype=torch.long)
            for i, s in enumerate(v.surfaces):     # every id, byte-fallback duplicates included
                if s:
                    to_main[i] = main_index.get(s, -1)
            from_main = torch.full((len(mv.surfaces),), -1, dtype=torch.long)
            for s, j in main_index.items():
                from_main[j] = own.get(s, -1)
            self.to_main[n], self.from_main[n] = to_main.to(self.device), from_main.to(self.device)

    def __call__(self, logits, step=None):
        if len(self.names) == 1:
            return torch.log_softmax(logits[self.main].to(self.device, torch.float32), -1)
        probs = {n: torch.softmax(logits[n].to(self.device, torch.float32), -1) for n in self.names}
        p_main = probs[self.main]
        in_union = torch.zeros_like(p_main, dtype=torch.bool)
        for n in self.names:
            top = probs[n].topk(min(self.settings.topk, probs[n].shape[-1]), -1).indices
            mapped = self.to_main[n][top.clamp(max=len(self.to_main[n]) - 1)]
            mapped = torch.where(top < len(self.to_main[n]), mapped, -1)
            rows = torch.arange(top.shape[0], device=top.device)[:, None].expand_as(mapped)
            ok = mapped >= 0
            in_union[rows[ok], mapped[ok]] = True
        fused = torch.zeros_like(p_main)
        weights = self.row_weights(logits, step)
        for i, n in enumerate(self.names):
            w = weights[:, i:i + 1]
            if n == self.main:
                fused += w * p_main
                continue
            src = self.from_main[n]
            cols = (src >= 0).nonzero(as_tuple=True)[0]
            on_main = torch.zeros_like(p_main)
            on_main[:, cols] = probs[n][:, src[cols]]
            fused += w * on_main * in_union
        w_main = weights[:, self.names.index(self.main)][:, None]
        fused = torch.where(in_union, fused, w_main * p_main)
        return torch.log(fused / fused.sum(-1, keepdim=True))
