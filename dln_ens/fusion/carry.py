"""Surfaces across vocabularies, shared by `unite` and `surface`.

A *key* names one candidate continuation: its surface bytes, or (an int) a special token of the
main member (EOS...), which has no surface and is read by the main member alone.
A surface is *carried* into a member's vocabulary by its bytes, falling back to the first token
of the member's tokenisation of the surface as a continuation of running text (UniTE's rule;
``FusionSetup.continuation``). Where a vocabulary holds the same bytes twice (a piece and its
byte-fallback token ``<0xNN>``), the surface stands for the member's more probable of them at
that step, so a member's own argmax token always carries its own surface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dln_ens.fusion.base import Fusion, FusionSetup, check_finite

Key = bytes | int


class Carrier:
    def __init__(self, setup: FusionSetup, names: list[str]):
        self.main = setup.main
        self.vocabs = {n: setup.vocab(n) for n in names}
        self.same: dict[str, dict[bytes, list[int]]] = {}   # surface -> every id with it
        for n, v in self.vocabs.items():
            same = self.same[n] = {}
            for i, s in enumerate(v.surfaces):
                if s:
                    same.setdefault(s, []).append(i)
        self._continuation = setup.continuation
        self._ids: dict[tuple[str, bytes], list[int]] = {}

    def ids(self, name: str, key: Key) -> list[int]:
        """Member ``name``'s token ids of the key as a continuation ([] if it has none)."""
        if isinstance(key, int):
            return [key] if name == self.main else []
        got = self._ids.get((name, key))
        if got is None:
            got = self._ids[(name, key)] = list(self._continuation(name, key))
        return got

    def carry(self, name: str, key: Key, logits: torch.Tensor) -> int | None:
        """The one id of member ``name`` that stands for the key (None if none); ``logits`` [V]
        the member's at this step (they decide between ids with the same surface)."""
        if isinstance(key, int):
            return key if name == self.main else None
        ids = [i for i in self.same[name].get(key, ()) if i < logits.shape[-1]]
        if ids:
            return ids[0] if len(ids) == 1 else ids[int(logits[ids].argmax())]
        seq = self.ids(name, key)
        return seq[0] if seq else None

    def single(self, name: str, key: Key, logits: torch.Tensor) -> int | None:
        """The member's id for a key that is one of its tokens, else None."""
        if isinstance(key, int) or key in self.same[name]:
            return self.carry(name, key, logits)
        return None

    def union(self, logits: dict[str, torch.Tensor], k: int) -> list[list[Key]]:
        """Per row, the union of every member's top-k next tokens as keys (first seen first).
        Special tokens of members other than the main one and ids without a surface are left
        out, and so are bare spaces that a word candidate starts with (`_without_bare_spaces`)."""
        tops = {n: z.topk(min(k, z.shape[-1]), -1).indices.tolist() for n, z in logits.items()}
        B = next(iter(logits.values())).shape[0]
        out = []
        for b in range(B):
            seen: dict[Key, None] = {}
            for n, top in tops.items():
                surf = self.vocabs[n].surfaces
                for i in top[b]:
                    s = surf[i] if i < len(surf) else None
                    if s:
                        seen[s] = None
                    elif n == self.main:
                        seen[i] = None
            out.append(_without_bare_spaces(list(seen)))
        return out


def _without_bare_spaces(keys: list[Key]) -> list[Key]:
    """Drop a candidate made of spaces only when another candidate is those spaces and then a
    word: a member that keeps the space as a token of its own (WordPiece-style) is nearly sure of
    it whatever the word, so the bare space would otherwise outvote every word."""
    words = [k for k in keys if isinstance(k, bytes) and k.strip(b" ")]
    return [k for k in keys if not (isinstance(k, bytes) and k and not k.strip(b" ")
                                    and any(w.startswith(k) and w[len(k):len(k) + 1] != b" " for w in words))]


def onto_main(floor: torch.Tensor, main_ids: list[list[int | None]], fused: list[torch.Tensor]) -> torch.Tensor:
    """[B, V_main] log-probabilities: row b's candidate j puts ``fused[b][j]`` on the main token
    ``main_ids[b][j]`` (the highest when several share one token); other tokens keep ``floor``
    (the main member's weighted probability, so every score stays finite); rows renormalised."""
    out = floor.clone()
    for b, (ids, vals) in enumerate(zip(main_ids, fused)):
        keep = [j for j, i in enumerate(ids) if i is not None]
        if not keep:
            continue
        cols = torch.tensor([ids[j] for j in keep], device=out.device)
        best = torch.full_like(out[b], -1.0).scatter_reduce(0, cols, vals[keep].to(out), "amax")
        out[b] = torch.where(best > 0, best, out[b])
    return torch.log(out / out.sum(-1, keepdim=True))


@dataclass(frozen=True)
class TopkSettings:
    topk: int = 10     # next tokens taken from each member

    def check(self, num_members: int) -> None:
        check_finite(self, "topk", 1, integer=True)


class CandidateFusion(Fusion):
    """Base of the methods that fuse over a per-row union of the members' top-k surfaces."""
    Settings = TopkSettings
    tokenises_text = True

    @classmethod
    def needs_vocab(cls, settings, num_members: int) -> bool:
        return True

    def __init__(self, setup, settings):
        super().__init__(setup, settings)
        self.carrier = Carrier(setup, self.names)

    def candidates(self, logits, step):
        """float32 logits on the fusion device, [B, N] weights, the floor of `onto_main`, and
        each row's candidate keys."""
        z = {n: logits[n].to(self.device, torch.float32) for n in self.names}
        w = self.row_weights(z, step)
        m = self.names.index(self.main)
        floor = w[:, m:m + 1] * torch.softmax(z[self.main], -1)
        return z, w, floor, self.carrier.union(z, self.settings.topk)
