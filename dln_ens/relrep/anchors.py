"""Anchors: tokens whose surface bytes exist in every member's vocabulary, one id per member.

When a member has several ids with the same surface (e.g. deepseek-coder's base ``ü`` and its
added duplicate, or a byte-fallback ``<0x41>`` next to ``A``), the lowest id is the anchor.
Anchors are ordered by their surface bytes, so the order does not depend on member order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from dln_ens.errors import UserError


class AnchorError(UserError, ValueError):
    """Too few (or inconsistent) anchors, with the members and the fix in the message."""


@dataclass
class Anchors:
    members: list[str]
    ids: dict[str, list[int]]        # member -> token id of each anchor
    surfaces: list[bytes]            # each anchor's bytes

    def __len__(self) -> int:
        return len(self.surfaces)

    def id_tensor(self, member: str) -> torch.Tensor:
        return torch.tensor(self.ids[member], dtype=torch.long)

    def subset(self, keep: list[int]) -> "Anchors":
        return Anchors(list(self.members), {m: [v[i] for i in keep] for m, v in self.ids.items()},
                       [self.surfaces[i] for i in keep])

    def to_json(self) -> dict:
        return {"members": list(self.members), "ids": {m: list(v) for m, v in self.ids.items()},
                "surfaces": [s.hex() for s in self.surfaces]}

    @classmethod
    def from_json(cls, data: dict, where: str = "anchors.json") -> "Anchors":
        try:
            members, ids, surfaces = data["members"], data["ids"], data["surfaces"]
            anchors = cls(list(members), {m: [int(i) for i in ids[m]] for m in members},
                          [bytes.fromhex(s) for s in surfaces])
        except (KeyError, TypeError, ValueError) as e:
            raise AnchorError(f"{where}: not an anchors file ({type(e).__name__}: {e}); expected "
                              f'{{"members": [...], "ids": {{name: [...]}}, "surfaces": [hex, ...]}}') from None
        for m, v in anchors.ids.items():
            if len(v) != len(anchors.surfaces):
                raise AnchorError(f"{where}: member {m!r} has {len(v)} ids for {len(anchors.surfaces)} surfaces")
        return anchors

    @classmethod
    def load(cls, path: str | Path) -> "Anchors":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise AnchorError(f"{path}: cannot read the anchors file ({e})") from None
        return cls.from_json(data, str(path))


def surface_index(surfaces: list[bytes | None], num_rows: int | None = None) -> dict[bytes, int]:
    """Surface -> lowest token id with it (empty and special surfaces skipped; ids must be
    below ``num_rows``, the embedding rows, when given)."""
    index: dict[bytes, int] = {}
    n = len(surfaces) if num_rows is None else min(len(surfaces), num_rows)
    for i in range(n):
        s = surfaces[i]
        if s and s not in index:
            index[s] = i
    return index


def common_anchors(surfaces: dict[str, list[bytes | None]], min_anchors: int = 1,
                   num_rows: dict[str, int] | None = None) -> Anchors:
    """Anchors shared by all members. Fewer than ``min_anchors`` is an `AnchorError`."""
    members = list(surfaces)
    index = {m: surface_index(s, (num_rows or {}).get(m)) for m, s in surfaces.items()}
    common = set(index[members[0]])
    for m in members[1:]:
        common &= index[m].keys()
    keys = sorted(common)
    if len(keys) < min_anchors:
        pairs = [f"{a}&{b}: {len(index[a].keys() & index[b].keys())}"
                 for i, a in enumerate(members) for b in members[i + 1:]]
        sizes = ", ".join(f"{m}: {len(index[m])} surfaces" for m in members)
        raise AnchorError(
            f"members {', '.join(members)} share only {len(keys)} token surfaces, fewer than "
            f"min_anchors={min_anchors} ({sizes}; common per pair: {'; '.join(pairs) or '-'}). "
            f"Their tokenizers have (almost) no common tokens: ensemble members whose vocabularies "
            f"overlap, or lower min_anchors in the ensemble's config")
    return Anchors(members, {m: [index[m][k] for k in keys] for m in members}, keys)


@torch.no_grad()
def anchor_consistency(anchors: Anchors, embeddings: dict[str, torch.Tensor],
                       block_rows: int = 1024) -> torch.Tensor:
    """[A] how much each anchor's relative representation (its cosine similarities to all
    anchors) agrees across members: mean over member pairs of the cosine between the rows
    (DeePEn's ``get_anchor_point_list_our``, generalised to N members). Blocked: A x A never
    lives in memory at once."""
    members = anchors.members
    ea = {m: F.normalize(embeddings[m][anchors.id_tensor(m).to(embeddings[m].device)].float(), dim=-1)
          for m in members}
    A = len(anchors)
    if len(members) < 2:
        return torch.ones(A)
    out = torch.zeros(A)
    for start in range(0, A, block_rows):
        stop = min(start + block_rows, A)
        sims = {m: ea[m][start:stop] @ ea[m].T for m in members}
        total, pairs = 0.0, 0
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                total = total + F.cosine_similarity(sims[a], sims[b].to(sims[a].device), dim=-1).cpu()
                pairs += 1
        out[start:stop] = total / pairs
    return out


def most_consistent(anchors: Anchors, embeddings: dict[str, torch.Tensor], n: int) -> Anchors:
    """The n anchors whose relative representations agree most across members (kept in their
    surface order; ties broken by position)."""
    if n >= len(anchors):
        return anchors
    score = anchor_consistency(anchors, embeddings)
    order = sorted(range(len(anchors)), key=lambda i: (-float(score[i]), i))[:n]
    return anchors.subset(sorted(order))
