"""Reading task data files: UTF-8 text, JSONL and JSON arrays of records, each record checked
for its keys and types. Every problem is a `DataError` naming the file and line."""
from __future__ import annotations

import json
from pathlib import Path

from dln_ens.errors import UserError

FETCH_HINT = ("fetch the public data with `sh sh/data.sh` (online) or copy a local copy with "
              "`sh sh/data.sh --from DIR`, or pass root=<folder holding it>")


class DataError(UserError, ValueError):
    """A data file problem, naming the file (and line) and what is wrong."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file that is not there."""


def need_file(path: Path) -> Path:
    if not path.is_file():
        raise MissingDataError(f"{path}: data file not found; {FETCH_HINT}")
    return path


def read_text(path: Path) -> str:
    """The whole file as UTF-8, or a DataError naming the file and the first bad byte."""
    data = need_file(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; {FETCH_HINT}")
    return text


def _check_record(rec, where: str, required: dict[str, type]) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key, tp in required.items():
        if key not in rec:
            raise DataError(f"{where}: missing key {key!r} (a record needs {', '.join(required)})")
        if not isinstance(rec[key], tp):
            names = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            raise DataError(f"{where}: key {key!r} must be {names}, got {type(rec[key]).__name__}")
    return rec


def read_jsonl_records(path: Path, required: dict[str, type]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line."""
    out = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):   # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        out.append((lineno, _check_record(rec, f"{path}:{lineno}", required)))
    return out


def _object_lines(text: str, depth: int) -> list[int]:
    """Line of each '{' opened at nesting ``depth`` (1 = inside the top-level container),
    outside strings: the records of a JSON array, for error messages."""
    lines, level, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            if ch == "{" and level == depth:
                lines.append(line)
            level += 1
        elif ch in "}]":
            level -= 1
    return lines


def read_json_records(path: Path, required: dict[str, type], key: str | None = None) -> list[tuple[int, dict]]:
    """(line number, record) for the array at the top level or under ``key``."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}:1: expected an object with a {key!r} list")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a list of records{f' under {key!r}' if key else ''}")
    if not data:
        raise DataError(f"{path}: no records{f' under {key!r}' if key else ''}; {FETCH_HINT}")
    lines = _object_lines(text, 2 if key else 1)
    if len(lines) != len(data):   # non-object items or other nested objects: fall back to indices
        lines = [0] * len(data)
    out = []
    for i, (line, rec) in enumerate(zip(lines, data)):
        where = f"{path}:{line}" if line else f"{path}"
        out.append((line, _check_record(rec, f"{where}: record {i}", required)))
    return out
