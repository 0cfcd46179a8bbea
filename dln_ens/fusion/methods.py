"""Fusion methods behind one interface, so ablations switch them by name.

``Fusion(method, ...)(logits)`` maps each member's next-token logits ``{name: [B, V_m]}`` to
fused log-probabilities ``[B, V_main]`` over the main member's vocabulary:

- ``deepen``: p_m -> r_m = p_m @ R_m -> q = sum_m w_m r_m -> inverse search from the main
  logits (`inverse.deepen_inverse`). ``lr == 0`` is the main member alone.
- ``main``: the main member alone (log_softmax of its logits).
- ``union``: in the spirit of UniTE / GaC: U = union of the members' top-k next tokens,
  matched by surface bytes, kept when the main vocabulary has that surface. A main token with
  surface s in U gets ``sum_m w_m p_m(s)`` (p_m(s) = member m's probability of its token with
  surface s, 0 if it has none); a main token outside U keeps ``w_main p_main``, so no token
  gets probability zero (scores stay finite); then renormalise.
"""
from __future__ import annotations

import re

import torch

from dln_ens.fusion.inverse import deepen_inverse
from dln_ens.fusion.relative import aggregate, to_relative, top_mass_support
from dln_ens.relrep.matrix import RelRepMatrix

METHODS = ("deepen", "main", "union")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def needs_matrices(method: str, names: list[str], lr: float, steps: int) -> bool:
    """Whether the fusion reads relative-representation matrices (deepen with a real search)."""
    return method == "deepen" and len(names) > 1 and lr != 0 and steps != 0


def normalise_weights(names: list[str], weights: dict[str, float] | None) -> list[float]:
    if weights is None:
        return [1.0 / len(names)] * len(names)
    unknown = set(weights) - set(names)
    missing = [n for n in names if n not in weights]
    if unknown or missing:
        raise ValueError(f"ensemble weights must name exactly the members {names}: "
                         f"unknown {sorted(unknown)}, missing {missing}")
    w = [float(weights[n]) for n in names]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {weights}")
    return [x / sum(w) for x in w]


def canonical_ids(surfaces: list[bytes | None], tokens: list[str | None], width: int) -> dict[bytes, int]:
    """Surface -> the id a tokenizer would use for it: a vocabulary token before a byte-fallback
    token ``<0xNN>`` with the same bytes, then the lowest id. Ids >= width (no logit) skipped."""
    out: dict[bytes, int] = {}
    for i in range(min(len(surfaces), width)):
        s = surfaces[i]
        if not s:
            continue
        j = out.get(s)
        if j is None or (_BYTE_TOKEN.match(tokens[j] or "") and not _BYTE_TOKEN.match(tokens[i] or "")):
            out[s] = i
    return out


class Fusion:
    """One fused step. ``tail_mass`` > 0 restricts the relative-space work to each row's top
    tokens holding 1 - tail_mass of the mass (see `relative`); 0 is the exact computation."""

    def __init__(self, method: str, names: list[str], main: str, *, matrices: dict[str, RelRepMatrix] | None = None,
                 weights: dict[str, float] | None = None, lr: float = 0.15, steps: int = 5,
                 union_topk: int = 10, tail_mass: float = 0.0, max_support: int = 256,
                 surfaces: dict[str, list[bytes | None]] | None = None,
                 tokens: dict[str, list[str | None]] | None = None, device="cpu"):
        if method not in METHODS:
            raise ValueError(f"unknown fusion method {method!r}; choose one of {METHODS}")
        if main not in names:
            raise ValueError(f"main member {main!r} is not among the members {names}")
        self.method, self.names, self.main = method, list(names), main
        self.weights = normalise_weights(self.names, weights)
        self.lr, self.steps, self.union_topk = lr, steps, union_topk
        self.tail_mass, self.max_support = tail_mass, max_support
        self.device = torch.device(device)
        self.matrices = {}
        if needs_matrices(method, self.names, lr, steps):
            if matrices is None or any(n not in matrices for n in self.names):
                raise ValueError(f"method 'deepen' needs a relative-representation matrix for every member "
                                 f"{self.names}; build them with `sh sh/mat.sh`")
            self.matrices = {n: matrices[n].to(self.device) for n in self.names}
        if method == "union":
            if surfaces is None or tokens is None:
                raise ValueError("method 'union' needs every member's token surfaces and token strings")
            self._build_union_maps(surfaces, tokens)

    def _build_union_maps(self, surfaces, tokens):
        """member id -> main id with the same surface (-1: none), and main id -> member id."""
        self.widths = {n: len(surfaces[n]) for n in self.names}
        main_index = canonical_ids(surfaces[self.main], tokens[self.main], len(surfaces[self.main]))
        self.to_main, self.from_main = {}, {}
        for n in self.names:
            own = canonical_ids(surfaces[n], tokens[n], len(surfaces[n]))
            to_main = torch.full((len(surfaces[n]),), -1, dtype=torch.long)
            for s, i in own.items():
                to_main[i] = main_index.get(s, -1)
            from_main = torch.full((len(surfaces[self.main]),), -1, dtype=torch.long)
            for s, j in main_index.items():
                from_main[j] = own.get(s, -1)
            self.to_main[n], self.from_main[n] = to_main.to(self.device), from_main.to(self.device)

    def __call__(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = {n: logits[n].to(self.device, torch.float32) for n in self.names}
        z = logits[self.main]
        if self.method == "main" or len(self.names) == 1:
            return torch.log_softmax(z, -1)
        if self.method == "union":
            return self._union(logits)
        return self._deepen(logits)

    def _support(self, probs):
        return None if self.tail_mass <= 0 else top_mass_support(probs, self.tail_mass, self.max_support)

    def _deepen(self, logits):
        if self.lr == 0 or self.steps == 0:
            return torch.log_softmax(logits[self.main], -1)
        rels, main_support = [], None
        for n in self.names:
            p = torch.softmax(logits[n], -1)
            support = self._support(p)
            rels.append(to_relative(p, self.matrices[n], support))
            if n == self.main:
                main_support = support
        q = aggregate(rels, self.weights)
        return deepen_inverse(logits[self.main], q, self.matrices[self.main], self.lr, self.steps, main_support)

    def _union(self, logits):
        probs = {n: torch.softmax(logits[n], -1) for n in self.names}
        p_main = probs[self.main]
        in_union = torch.zeros_like(p_main, dtype=torch.bool)
        for n in self.names:
            top = probs[n].topk(min(self.union_topk, probs[n].shape[-1]), -1).indices
            mapped = self.to_main[n][top.clamp(max=len(self.to_main[n]) - 1)]
            mapped = torch.where(top < len(self.to_main[n]), mapped, -1)
            rows = torch.arange(top.shape[0], device=top.device)[:, None].expand_as(mapped)
            ok = mapped >= 0
            in_union[rows[ok], mapped[ok]] = True
        fused = torch.zeros_like(p_main)
        for w, n in zip(self.weights, self.names):
            if n == self.main:
                fused += w * p_main
                continue
            src = self.from_main[n]
            have = src >= 0
            on_main = torch.zeros_like(p_main)
            cols = have.nonzero(as_tuple=True)[0]
            on_main[:, cols] = probs[n][:, src[cols]]
            fused += w * on_main * in_union
        w_main = self.weights[self.names.index(self.main)]
        fused = torch.where(in_union, fused, w_main * p_main)
        return torch.log(fused / fused.sum(-1, keepdim=True))
