"""Build `LanguageModel` backends from a validated config, each once.

Ensembles, MoD members, DLN layers, proposers and posterior samplers name backends; the pool
constructs each on first use and shares it, so a zoo member used alone and inside an ensemble
is loaded once.
"""
from __future__ import annotations

import importlib
import inspect

from dln_ens.config import (ClassBackend, Config, ConfigError, EnsembleBackend, HFBackend,
                            ModBackend)
from dln_ens.lm.base import LanguageModel
from dln_ens.lm.openai_backend import OpenAIBackend, build_openai, describe_openai, validate_openai


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


def describe_backend(cfg: Config, name: str) -> dict:
    """What a results table says about a backend (type, fusion settings, matrix format)."""
    b = cfg.backends[name]
    info = {"backend": name, "type": b.type}
    if isinstance(b, EnsembleBackend):
        info.update(members="+".join(b.members), main=b.main, method=b.method, score_mode=b.score_mode)
        if b.method == "deepen":  # the other methods use neither the inverse search nor matrices
            info.update(lr=b.lr, steps=b.steps,
                        matrix="dense" if b.topk is None else f"sparse k={b.topk}")
        elif b.method == "union":
            info.update(union_topk=b.union_topk)
    elif isinstance(b, ModBackend):
        info.update(base=b.base, k_last=b.k_last, router=b.router, top_k=b.top_k,
                    head=b.head or "untrained")
    elif isinstance(b, HFBackend):
        info.update(path=b.path)
    elif isinstance(b, ClassBackend):
        info.update(cls=b.class_)
    elif isinstance(b, OpenAIBackend):
        info.update(describe_openai(b))
    return info


class BackendPool:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._built: dict[str, LanguageModel] = {}
        self.validate()

    def validate(self) -> None:
        """Checks that need imports or the environment but no model loading: user classes resolve
        and look like a LanguageModel; API key variables are set."""
        for name, b in self.cfg.backends.items():
            if isinstance(b, OpenAIBackend):
                validate_openai(b, f"{self.cfg.source}: backend {name!r}")
            if isinstance(b, ClassBackend):
                where = f"{self.cfg.source}: key 'backends.{name}.class'"
                cls = import_class(b.class_, where)
                missing = [m for m in ("generate", "score", "next_token_logprobs")
                           if not callable(getattr(cls, m, None))]
                if missing:
                    raise ConfigError(f"{where}: {b.class_} does not implement the LanguageModel "
                                      f"protocol (missing {', '.join(missing)})")

    def get(self, name: str) -> LanguageModel:
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def _build(self, name: str) -> LanguageModel:
        b = self.cfg.backends[name]
        where = f"{self.cfg.source}: backend {name!r}"
        if isinstance(b, HFBackend):
            from dln_ens.lm.hf import HFLanguageModel
            return HFLanguageModel.from_pretrained(
                b.path, device=b.device, dtype=b.dtype, device_map=b.device_map,
                trust_remote_code=b.trust_remote_code, name=name, batch_size=b.batch_size)
        if isinstance(b, ModBackend):
            from dln_ens.mod.model import DepthEnsembleLanguageModel
            base = self.get(b.base)
            if b.head is not None:
                lm = DepthEnsembleLanguageModel.from_head(base, b.head)
                for key in ("k_last", "router", "top_k"):
                    if getattr(lm, key) != getattr(b, key):
                        raise ConfigError(f"{where}: {key}={getattr(b, key)!r} in the config but the "
                                          f"head in {b.head} was trained with {getattr(lm, key)!r}; "
                                          f"set it to match or retrain with `dln-ens tune-mod`")
            else:
                lm = DepthEnsembleLanguageModel(base, b.k_last, router=b.router, top_k=b.top_k)
            lm.name = name
            return lm
        if isinstance(b, EnsembleBackend):
            from dln_ens.ensemble.model import EnsembleLanguageModel
            members = {m: self.get(m) for m in b.members}
            return EnsembleLanguageModel(
                members, main=b.main, matrices=b.matrices, weights=b.weights, method=b.method,
                lr=b.lr, steps=b.steps, union_topk=b.union_topk, score_mode=b.score_mode,
                compute_device=b.compute_device, name=name)
        if isinstance(b, OpenAIBackend):
            return build_openai(b, name)
        if isinstance(b, ClassBackend):
            cls = import_class(b.class_, f"{where}, key 'class'")
            kwargs = dict(b.kwargs)
            if "name" in inspect.signature(cls).parameters and "name" not in kwargs:
                kwargs["name"] = name
            lm = cls(**kwargs)
            if not getattr(lm, "name", None):
                lm.name = name
            return lm
        raise AssertionError(f"unhandled backend type {type(b)}")
