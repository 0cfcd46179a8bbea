"""Build `LanguageModel` backends from a validated config, each once.

Ensembles, MoD members, DLN layers, proposers and posterior samplers name backends; the pool
constructs each on first use and shares it, so a zoo member used alone and inside an ensemble
is loaded once. Each backend type's build and describe live in `backend_types`.
"""
from __future__ import annotations

from dln_ens.backend_types import BACKEND_TYPES
from dln_ens.config import Config, check_context
from dln_ens.lm.base import LanguageModel


def describe_backend(cfg: Config, name: str) -> dict:
    """What a results table says about a backend (its type and every setting that matters)."""
    b = cfg.backends[name]
    return {"backend": name, "type": b.type, **BACKEND_TYPES[b.type].describe(b)}


class BackendPool:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._built: dict[str, LanguageModel] = {}
        self.validate()

    def validate(self) -> None:
        """Checks that need imports but no model loading (user classes resolve, implement the
        protocol, and implement `LocalMember` where an ensemble fuses them)."""
        ctx = check_context(self.cfg)
        for name, b in self.cfg.backends.items():
            BACKEND_TYPES[b.type].validate(b, name, ctx)

    def get(self, name: str) -> LanguageModel:
        if name not in self._built:
            b = self.cfg.backends[name]
            self._built[name] = BACKEND_TYPES[b.type].build(b, self, name)
        return self._built[name]
