"""One name -> task loader table, shared by synthetic generators and real-data loaders.

`load_task("navigate")`, `load_task("bbh/date_understanding", root="datasets")`... Loaders
register themselves with `@register_task(name)`; modules holding loaders are imported lazily
on first lookup so that `import dln_ens` stays cheap.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable

from dln_ens.data.task import Task
from dln_ens.errors import UserError

_LOADERS: dict[str, Callable[..., Task]] = {}
_LOADER_MODULES = ("dln_ens.data.synthetic", "dln_ens.data.loaders")


class UnknownTaskError(UserError, KeyError):
    def __str__(self) -> str:   # KeyError would print the message in quotes
        return str(self.args[0])


def register_task(name: str):
    def deco(fn: Callable[..., Task]) -> Callable[..., Task]:
        _LOADERS[name] = fn
        return fn
    return deco


def _import_loaders() -> None:
    for mod in _LOADER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real import error inside the module must surface
                raise


def task_names() -> list[str]:
    _import_loaders()
    return sorted(_LOADERS)


def load_task(name: str, **kwargs) -> Task:
    """Load a task by registered name; kwargs (seed, root, sizes...) go to its loader."""
    _import_loaders()
    if name not in _LOADERS:
        close = difflib.get_close_matches(name, list(_LOADERS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name](**kwargs)
