"""One name -> task loader table, shared by synthetic generators and real-data loaders.

`load_task("navigate")`, `load_task("bbh/date_understanding", root="datasets")`... Loaders
register themselves with `@register_task(name)`; modules holding loaders are imported lazily
on first lookup so that `import dln_ens` stays cheap.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import warnings
from typing import Callable

from dln_ens.data.task import Task
from dln_ens.errors import UserError

_LOADERS: dict[str, Callable[..., Task]] = {}
_LOADER_MODULES = ("dln_ens.data.synthetic", "dln_ens.data.loaders")


class EmptySplitError(UserError, ValueError):
    pass


class UnknownTaskError(UserError, KeyError):
    def __str__(self) -> str:   # KeyError would print the message in quotes
        return str(self.args[0])


def register_task(name: str):
    def deco(fn: Callable[..., Task]) -> Callable[..., Task]:
        _LOADERS[name] = fn
        return fn
    return deco


@contextlib.contextmanager
def registered_tasks(loaders: dict[str, Callable[..., Task]]):
    """Register ``loaders`` for the length of a ``with`` block (tests, experiments), then put
    the table back as it was, so no name outlives its block."""
    before = {n: _LOADERS[n] for n in loaders if n in _LOADERS}
    _LOADERS.update(loaders)
    try:
        yield
    finally:
        for n in loaders:
            _LOADERS.pop(n, None)
        _LOADERS.update(before)


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


def load_task(name: str, drop_dev_test_overlap: bool = False, **kwargs) -> Task:
    """Load a task by registered name; kwargs (seed, root, sizes...) go to its loader.

    Every split must hold examples. Dev examples whose input also appears in test (some public
    task files share items) are reported with a warning and counted in ``meta["dev_test_overlap"]``;
    ``drop_dev_test_overlap=True`` removes them from dev."""
    _import_loaders()
    if name not in _LOADERS:
        close = difflib.get_close_matches(name, list(_LOADERS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(_LOADERS))}")
    task = _LOADERS[name](**kwargs)
    source = task.meta.get("source", "its loader")
    for split in ("train", "dev", "test"):
        if not getattr(task, split):
            raise EmptySplitError(f"task {name!r} ({source}): the {split} split is empty "
                                  f"({len(task.train)}/{len(task.dev)}/{len(task.test)} train/dev/test "
                                  f"examples); the data files hold too few records")
    test_inputs = {ex.input for ex in task.test}
    shared = [ex for ex in task.dev if ex.input in test_inputs]
    task.meta["dev_test_overlap"] = len(shared)
    if shared and drop_dev_test_overlap:
        task.dev = [ex for ex in task.dev if ex.input not in test_inputs]
        task.meta["dev_test_overlap_dropped"] = len(shared)
        if not task.dev:
            raise EmptySplitError(f"task {name!r} ({source}): every dev example is also in test")
    elif shared:
        warnings.warn(f"task {name!r} ({source}): {len(shared)} of {len(task.dev)} dev examples also appear "
                      f"in test (same input); pass drop_dev_test_overlap=True (in a config: \"task_kwargs\": "
                      f"{{\"drop_dev_test_overlap\": true}}) to remove them from dev")
    return task
