"""``deepen``: DeePEn (Huang et al. 2024). p_m -> r_m = p_m @ R_m -> q = sum_m w_m r_m -> the
inverse search from the main member's logits (`inverse.deepen_inverse`).

``tail_mass`` > 0 lets the relative-space work be restricted to each row's top tokens holding
1 - tail_mass of the mass, at most ``max_support`` of them (`relative`); 0 is exact. The
restriction is used only where it saves work: a member whose matrix is used in dense form with
at most ``EXACT_ENTRIES`` entries (the zoo's: 1000 x 212) is computed exactly, which is faster
there (a few small matmuls instead of top-k, gathers and scatters; `python -m dln_ens.bench
fusion` measures both).
``lr == 0`` or ``steps == 0`` is the main member alone: then no other member is run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dln_ens.fusion.base import Fusion, SettingsError, check_finite
from dln_ens.fusion.inverse import deepen_inverse
from dln_ens.fusion.relative import aggregate, support_rows, to_relative, top_mass_support
from dln_ens.relrep.matrix import RelRepMatrix


DENSE_ENTRIES = 1 << 22   # a sparse matrix with at most this many V x A entries is used in dense form
EXACT_ENTRIES = 1 << 21   # a dense matrix with at most this many entries is never restricted to a support


def restricts(mat: RelRepMatrix) -> bool:
    """Whether a support restriction saves work with this (computing-form) matrix: not for a
    small dense one, where the exact products cost less than selecting a support."""
    return mat.is_sparse or mat.num_rows * mat.num_anchors > EXACT_ENTRIES


def computing_form(mat: RelRepMatrix) -> RelRepMatrix:
    """A small sparse matrix (e.g. the zoo's, 1000 x 212) as its dense form: the same values,
    and a product over a support becomes a small matmul instead of k scattered adds per token
    (the results agree to float rounding)."""
    if mat.is_sparse and mat.num_rows * mat.num_anchors <= DENSE_ENTRIES:
        return RelRepMatrix(mat.num_anchors, dense=mat.to_dense())
    return mat


class DeepenFusion(Fusion):
    name = "deepen"

    @dataclass(frozen=True)
    class Settings:
        lr: float = 0.15
        steps: int = 5
        tail_mass: float = 1e-4
        max_support: int = 256

        def check(self, num_members: int) -> None:
            check_finite(self, "lr", 0.0)
            check_finite(self, "steps", 0, integer=True)
            check_finite(self, "tail_mass", 0.0)
            check_finite(self, "max_support", 1, integer=True)
            if num_members > 1 and self.steps == 0:
                raise SettingsError("steps is 0, which makes method \"deepen\" the main member alone; use "
                                    "method \"main\" for that (or lr 0), or steps >= 1", "steps")
            if self.tail_mass >= 1:
                raise SettingsError(f"tail_mass must be less than 1 (0 = exact), got {self.tail_mass}",
                                    "tail_mass")

    @classmethod
    def searches(cls, settings, num_members: int) -> bool:
        return num_members > 1 and settings.lr != 0 and settings.steps != 0

    @classmethod
    def needs_matrices(cls, settings, num_members: int) -> bool:
        return cls.searches(settings, num_members)

    def __init__(self, setup, settings):
        super().__init__(setup, settings)
        self.search = self.searches(settings, len(self.names))
        self.matrices = {}
        if self.search:
            mats = setup.matrices or {}
            missing = [n for n in self.names if n not in mats]
            if missing:
                raise SettingsError(f"method 'deepen' needs a relative-representation matrix for every member; "
                                    f"missing {missing}: build them with `sh sh/mat.sh`")
            self.matrices = {n: computing_form(mats[n].to(self.device)) for n in self.names}
        self.restricted = {n: settings.tail_mass > 0 and restricts(m) for n, m in self.matrices.items()}

    def active(self) -> list[str]:
        return super().active() if self.search else [self.main]

    def _support(self, probs, name):
        s = self.settings
        return top_mass_support(probs, s.tail_mass, s.max_support) if self.restricted[name] else None

    def __call__(self, logits, step=None):
        return self._fuse(logits, step)

    def target_logprobs(self, logits, targets):
        return self._fuse(logits, None, targets.to(self.device))

    def _fuse(self, logits, step, targets=None):
        z = logits[self.main].to(self.device, torch.float32)
        if not self.search:
            lp = torch.log_softmax(z, -1)
            return lp if targets is None else lp.gather(1, targets[:, None])[:, 0]
        rels, main_support, main_rows, main_probs = [], None, None, None
        for n in self.names:
            p = torch.softmax(logits[n].to(self.device, torch.float32), -1)
            support = self._support(p, n)
            rows = None if support is None else support_rows(support, self.matrices[n])
            rels.append(to_relative(p, self.matrices[n], support, rows))
            if n == self.main:   # the inverse search reuses them (and overwrites the probabilities)
                main_support, main_rows, main_probs = support, rows, p
        w = self.row_weights(logits, step)
        q = aggregate(rels, [w[:, i:i + 1] for i in range(len(self.names))])
        return deepen_inverse(z, q, self.matrices[self.main], self.settings.lr, self.settings.steps, main_support,
                              main_rows, targets=targets, r0=rels[self.names.index(self.main)], probs=main_probs)
