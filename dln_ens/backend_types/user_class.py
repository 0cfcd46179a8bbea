"""``class``: a user's own `LanguageModel`, named by import path ``package.module:Name``."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Literal

from dln_ens.backend_types.base import BackendType, CheckContext
from dln_ens.confparse import ConfigError


@dataclass
class ClassBackend:
    type: Literal["class"]
    class_: str = field(metadata={"key": "class"})
    kwargs: dict = field(default_factory=dict)


def import_class(spec: str, where: str) -> type:
    """Resolve ``package.module:Name`` with an error that says what failed."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({e}); "
                          f"is it installed or on PYTHONPATH?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}") from None


def _check(b: ClassBackend, name: str, ctx: CheckContext) -> None:
    if ":" not in b.class_:
        raise ctx.error(f"backends.{name}.class", f"{b.class_!r} must look like 'package.module:ClassName'")


def _validate(b: ClassBackend, name: str, ctx: CheckContext) -> None:
    where = f"{ctx.source}: key 'backends.{name}.class'"
    cls = import_class(b.class_, where)
    missing = [m for m in ("generate", "score", "next_token_logprobs") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(f"{where}: {b.class_} does not implement the LanguageModel protocol "
                          f"(missing {', '.join(missing)})")


def _check_member(b: ClassBackend, name: str, where: str, ctx: CheckContext) -> None:
    from dln_ens.lm.base import missing_member_parts
    missing = missing_member_parts(import_class(b.class_, f"{ctx.source}: key 'backends.{name}.class'"),
                                   attributes=False)
    if missing:
        raise ctx.error(where, f"backend {name!r} ({b.class_}) cannot be an ensemble member: it lacks "
                        f"{', '.join(missing)} (the fusion steps every member on its own tokenizer and KV "
                        f"cache; see dln_ens.lm.base.LocalMember); use it as a single backend instead")


def _build(b: ClassBackend, pool, name: str):
    cls = import_class(b.class_, f"{pool.cfg.source}: backend {name!r}, key 'class'")
    kwargs = dict(b.kwargs)
    if "name" in inspect.signature(cls).parameters and "name" not in kwargs:
        kwargs["name"] = name
    lm = cls(**kwargs)
    if not getattr(lm, "name", None):
        lm.name = name
    return lm


TYPE = BackendType(schema=ClassBackend, build=_build, describe=lambda b: {"cls": b.class_}, check=_check,
                   validate=_validate, check_member=_check_member)
