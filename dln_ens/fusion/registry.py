"""Fusion methods by name: a new method is one module with a `Fusion` subclass plus one line here."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

import torch

from dln_ens.fusion.base import Fusion, FusionSetup, SettingsError, Vocab, normalise_weights
from dln_ens.fusion.deepen import DeepenFusion
from dln_ens.fusion.main_only import MainFusion
from dln_ens.fusion.union import UnionFusion
from dln_ens.fusion.unite import UniteFusion
from dln_ens.fusion.surface import SurfaceFusion
from dln_ens.fusion.weighting import Weighting

FUSION_METHODS: dict[str, type[Fusion]] = {
    "deepen": DeepenFusion,
    "main": MainFusion,
    "union": UnionFusion,
    "unite": UniteFusion,
    "surface": SurfaceFusion,
}


def fusion_class(method: str) -> type[Fusion]:
    cls = FUSION_METHODS.get(method)
    if cls is None:
        close = difflib.get_close_matches(str(method), list(FUSION_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(f"unknown fusion method {method!r}{hint}; choose one of {', '.join(FUSION_METHODS)}")
    return cls


def setting_names() -> list[str]:
    """Every registered method's setting names, in registry order (for results tables)."""
    names = (f.name for cls in FUSION_METHODS.values() for f in dataclasses.fields(cls.Settings))
    return list(dict.fromkeys(names))


def fusion_settings(method: str, settings: dict, num_members: int):
    """The method's ``Settings`` from a dict, checked: unknown keys and bad values are refused."""
    cls = fusion_class(method).Settings
    known = [f.name for f in dataclasses.fields(cls)]
    for k in settings:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SettingsError(f"fusion method {method!r} has no setting {k!r}; {hint}"
                                f"its settings: {', '.join(known) or 'none'}")
    s = cls(**settings)
    s.check(num_members)
    return s


def make_weighting(weighting: str | None, temperature: float, weights) -> Weighting:
    """The checked `Weighting`; None resolves to 'fixed' when weights are given, else 'uniform'."""
    w = Weighting(weighting or ("fixed" if weights else "uniform"), temperature)
    w.check(bool(weights))
    return w


def make_fusion(method: str, names: list[str], main: str, *, weights: dict[str, float] | None = None,
                matrices=None, vocab: Callable[[str], Vocab] | dict[str, Vocab] | None = None,
                continuation: Callable[[str, bytes], list[int]] | None = None, weighting: str | None = None,
                weighting_temperature: float = 0.1, device="cpu", **settings) -> Fusion:
    """Build a fusion method by name; ``settings`` are the method's own knobs (e.g. lr, steps);
    ``weighting`` one of `fusion.weighting.SCHEMES` (None: 'fixed' with weights, else 'uniform')."""
    names = list(names)
    if main not in names:
        raise SettingsError(f"main member {main!r} is not among the members {names}")
    cls = fusion_class(method)
    s = fusion_settings(method, settings, len(names))
    if isinstance(vocab, dict):
        vocab = vocab.__getitem__
    if cls.needs_vocab(s, len(names)) and vocab is None:
        raise SettingsError(f"fusion method {method!r} needs every member's vocabulary (surfaces and tokens)")
    if cls.tokenises_text and continuation is None:
        raise SettingsError(f"fusion method {method!r} needs each member's tokenisation of text (continuation)")
    scheme = make_weighting(weighting, weighting_temperature, weights)
    setup = FusionSetup(names, main, normalise_weights(names, weights), torch.device(device),
                        matrices=matrices, vocab=vocab, continuation=continuation, weighting=scheme)
    return cls(setup, s)
