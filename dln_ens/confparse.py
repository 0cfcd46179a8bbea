"""A generic, strict parser from JSON data to typed dataclasses (the config schema lives in
`config` and in each backend type's module).

JSON with comments: lines whose first non-blank characters are ``//`` are ignored, and so are
keys named ``"//"`` or starting with ``"_comment"``. Every error is a ``ConfigError`` naming
the file, the key path and the fix: an unknown key (with a did-you-mean), a wrong type, a
missing required key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from dln_ens.checks import SettingError, check_name, check_number
from dln_ens.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, with file, key path and how to fix it in the message."""


# Range metadata on schema fields, checked by the parser on every value read (and by
# `check_fields` for configs built in Python): {"check": bounds for `checks.check_number`}; None
# stays allowed where the type allows it; the values of a dict are checked one by one.
# {"name": True}: a safe name (`checks.check_name`).

def at_least(low) -> dict:
    return {"check": {"ge": low}}


def above(low) -> dict:
    return {"check": {"gt": low}}


def read_json_with_comments(path: str) -> Any:
    """Parse a JSON file whose ``//`` comment lines are ignored; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (try conf/default.json)") from None
    lines = ["" if ln.lstrip().startswith("//") else ln for ln in text.splitlines()]
    try:
        return json.loads("\n".join(lines))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def strip_comments(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: strip_comments(v) for k, v in data.items()
                if not (k == "//" or k.startswith("_comment"))}
    if isinstance(data, list):
        return [strip_comments(v) for v in data]
    return data


def key_of(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    if origin is not None:
        return {list: "a list", dict: "an object"}.get(origin, str(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            dict: "an object", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str, ctx: "Ctx") -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, ctx)
            except ConfigError as e:
                errors.append((a, e))
        if len(errors) == 1:
            raise errors[0][1]
        objects = [e for a, e in errors if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(objects) == 1:   # an object: what is wrong inside it
            raise objects[0]
        raise ctx.error(where, f"expected {type_name(tp)}, got {json.dumps(value)[:80]}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
                isinstance(a, bool) for a in typing.get_args(tp) if a == value):
            choices = ", ".join(json.dumps(a) for a in typing.get_args(tp))
            raise ctx.error(where, f"{json.dumps(value)} is not allowed; use one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, where, ctx)
    if origin is list:
        if not isinstance(value, list):
            raise ctx.error(where, f"expected a list, got {json.dumps(value)[:80]}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(where, f"expected an object, got {json.dumps(value)[:80]}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {k: _coerce(v, vt, f"{where}.{k}", ctx) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ctx.error(where, f"must be a finite number, got {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, dict, list):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"config schema: unsupported type {tp}")
    raise ctx.error(where, f"expected {type_name(tp)}, got {json.dumps(value)[:80]}")


def parse_dataclass(cls: type, data: Any, where: str, ctx: "Ctx") -> Any:
    if not isinstance(data, dict):
        raise ctx.error(where, f"expected an object with keys {', '.join(key_of(f) for f in fields_of(cls))}")
    hints = typing.get_type_hints(cls)
    fields = {key_of(f): f for f in fields_of(cls)}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            raise ctx.error(f"{where}.{k}" if where else k, f"unknown key; {hint}")
    kwargs = {}
    for k, f in fields.items():
        sub = f"{where}.{k}" if where else k
        if k in data:
            kwargs[f.name] = _coerce(data[k], hints[f.name], sub, ctx)
            _check_field(f, kwargs[f.name], sub, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ctx.error(sub, f"missing required key; add \"{k}\": {type_name(hints[f.name])}")
    return cls(**kwargs)


def _check_field(f: dataclasses.Field, value: Any, where: str, ctx: "Ctx") -> None:
    """The field's range / name metadata on a parsed value."""
    if f.metadata.get("name"):
        ctx.check(where, check_name, value)
    bounds = f.metadata.get("check")
    if bounds and value is not None:
        for key, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            ctx.check(where, lambda: check_number("" if key is None else f"the value of {key!r}", v, **bounds))


def check_fields(obj: Any, where: str, source: str = "") -> None:
    """Range and name metadata of a config dataclass built in Python (the parser checks the
    same while reading a file)."""
    ctx = Ctx(source)
    for f in fields_of(type(obj)):
        _check_field(f, getattr(obj, f.name), f"{where}.{key_of(f)}" if where else key_of(f), ctx)


def fields_of(cls):
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


@dataclass
class Ctx:
    source: str

    def error(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source + ': ' if self.source else ''}key '{where}': {msg}")

    def check(self, where: str, fn, *args, note: str = "") -> None:
        """``fn(*args)``, a shared check (`dln_ens.checks`), with its SettingError as a ConfigError."""
        try:
            fn(*args)
        except SettingError as e:
            raise self.error(where, f"{e}{note}") from None


def config_to_dict(cfg: Any) -> Any:
    """The resolved config as plain JSON data (written into each run directory)."""
    if dataclasses.is_dataclass(cfg):
        return {key_of(f): config_to_dict(getattr(cfg, f.name)) for f in fields_of(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    return cfg
