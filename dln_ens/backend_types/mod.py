"""``mod``: a Mixture-of-Depths member over an ``hf`` backend (`DepthEnsembleLanguageModel`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from dln_ens.backend_types.base import BackendType, CheckContext
from dln_ens.confparse import ConfigError, at_least


@dataclass
class ModBackend:
    type: Literal["mod"]
    base: str                        # name of an `hf` backend in this config
    head: Union[str, None] = None    # directory written by `dln-ens tune-mod`; None = untrained
    k_last: int = field(default=2, metadata=at_least(1))
    router: Literal["learned", "uniform"] = "learned"
    top_k: Union[int, None] = field(default=None, metadata=at_least(1))


def _check(b: ModBackend, name: str, ctx: CheckContext) -> None:
    where = f"backends.{name}"
    ctx.need(f"{where}.base", b.base, ("hf",))
    if b.top_k is not None and not 1 <= b.top_k <= b.k_last:
        raise ctx.error(f"{where}.top_k", f"must be between 1 and k_last={b.k_last}, or null")
    if ctx.check_paths and b.head is not None and not Path(b.head).exists():
        raise ctx.error(f"{where}.head", f"{b.head} does not exist; train it with "
                        f"`dln-ens tune-mod --conf {ctx.source}` or set \"head\": null")


def _build(b: ModBackend, pool, name: str):
    from dln_ens.mod.model import DepthEnsembleLanguageModel
    base = pool.get(b.base)
    if b.head is None:
        lm = DepthEnsembleLanguageModel(base, b.k_last, router=b.router, top_k=b.top_k)
    else:
        lm = DepthEnsembleLanguageModel.from_head(base, b.head)
        for key in ("k_last", "router", "top_k"):
            if getattr(lm, key) != getattr(b, key):
                raise ConfigError(f"{pool.cfg.source}: backend {name!r}: {key}={getattr(b, key)!r} in the config "
                                  f"but the head in {b.head} was trained with {getattr(lm, key)!r}; "
                                  f"set it to match or retrain with `dln-ens tune-mod`")
    lm.name = name
    return lm


def _describe(b: ModBackend) -> dict:
    return {"base": b.base, "k_last": b.k_last, "router": b.router, "top_k": b.top_k, "head": b.head or "untrained"}


def _depends_on(b: ModBackend, other) -> dict:
    from dln_ens.fingerprint import folder_digest
    out = {"base": other(b.base)}
    if b.head is not None and Path(b.head).is_dir():
        out["head"] = folder_digest(b.head)
    return out


TYPE = BackendType(schema=ModBackend, build=_build, describe=_describe, check=_check,
                   check_member=lambda b, name, where, ctx: None, embeddings=lambda b, name: b.base,
                   depends_on=_depends_on)
