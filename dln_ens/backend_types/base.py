"""What a backend type is: its config schema, how it is built, described and checked.

A new backend type is one module that defines a schema dataclass (with ``type:
Literal["<name>"]``) and a `BackendType`, plus one line in `backend_types.BACKEND_TYPES`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from dln_ens.confparse import Ctx


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind!r}"


@dataclass
class CheckContext(Ctx):
    """Config-time checks of one file: errors name the file and key; references to other
    backends are resolved through ``need``."""
    backends: dict[str, Any] = None          # name -> parsed schema instance
    types: dict[str, "BackendType"] = None
    check_paths: bool = True

    def need(self, where: str, name: str | None, types: tuple[str, ...] = ()) -> Any:
        """The backend ``name`` refers to; it must exist (and be of one of ``types`` if given)."""
        if name is None:
            return None
        if name not in self.backends:
            close = difflib.get_close_matches(name, list(self.backends), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise self.error(where, f"names unknown backend {name!r}; {hint}defined: {', '.join(self.backends)}")
        b = self.backends[name]
        if types and b.type not in types:
            raise self.error(where, f"backend {name!r} is {_a(b.type)} backend; it must be one of: {', '.join(types)}")
        return b

    def need_member(self, where: str, name: str) -> Any:
        """``name`` must be a backend of a type an ensemble can fuse (`lm.base.LocalMember`); what
        needs imports (a user class's methods) is checked by ``validate``."""
        b = self.need(where, name)
        kind = self.types[b.type]
        if kind.check_member is None:
            ok = [t for t, k in self.types.items() if k.check_member is not None]
            why = f" ({kind.not_member})" if kind.not_member else ""
            raise self.error(where, f"backend {name!r} is {_a(b.type)} backend, which cannot be an ensemble "
                             f"member{why}; members must be local models: {', '.join(ok)}")
        return b


@dataclass(frozen=True)
class BackendType:
    schema: type                                    # the config dataclass
    build: Callable[[Any, Any, str], Any]           # (config, pool, name) -> LanguageModel
    describe: Callable[[Any], dict]                 # (config) -> results-table columns
    check: Callable[[Any, str, CheckContext], None] = lambda b, name, ctx: None   # at parse time
    # checks that need imports but no model loading (`backends.BackendPool` runs them first)
    validate: Callable[[Any, str, CheckContext], None] = lambda b, name, ctx: None
    # None: cannot be an ensemble member (``not_member`` says why); else a validate-time check
    # (config, name, where, ctx) of what the instance will expose
    check_member: Callable[[Any, str, str, CheckContext], None] | None = None
    not_member: str = ""
    # the `hf` backend whose embeddings (and tokenizer) its relative-representation matrix uses
    embeddings: Callable[[Any, str], str | None] = lambda b, name: None
    # what its outputs depend on beyond its settings, for cache keys: (config, fingerprint of
    # another backend by name) -> {part: digest}; e.g. a checkpoint's files (`dln_ens.fingerprint`)
    depends_on: Callable[[Any, Callable[[str], dict]], dict] = lambda b, other: {}
