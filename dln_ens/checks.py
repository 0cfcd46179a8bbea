"""Value checks shared by the config parser and the Python constructors: a number must be
finite and in range, ensemble weights must be usable. Each raises a `SettingError` naming the
setting, the value and the allowed range, so a bad value fails before any model loads and
never turns into NaN distributions, empty answers or a silent fall-back."""
from __future__ import annotations

import math
import re

from dln_ens.errors import UserError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SettingError(UserError, ValueError):
    """A setting (config key or constructor argument) with a value out of range."""


def check_number(key: str, value, *, ge=None, gt=None, le=None, lt=None, integer: bool = False,
                 optional: bool = False):
    """``value`` itself when it is a finite number within the bounds (None when ``optional``).
    The message starts with ``key`` (nothing when empty: the caller names the key)."""
    if value is None and optional:
        return value
    key = f"{key} " if key else ""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise SettingError(f"{key}must be {kind}{' or None' if optional else ''}, got {value!r}")
    if not math.isfinite(value):
        raise SettingError(f"{key}must be a finite number, got {value}")
    for bound, ok, words in ((ge, lambda b: value >= b, "at least"), (gt, lambda b: value > b, "greater than"),
                             (le, lambda b: value <= b, "at most"), (lt, lambda b: value < b, "less than")):
        if bound is not None and not ok(bound):
            raise SettingError(f"{key}must be {words} {bound}, got {value}")
    return value


def check_weights(key: str, weights: dict | None) -> dict | None:
    """Ensemble weights: each finite and >= 0, and not all zero (None = uniform)."""
    if weights is None:
        return None
    for name, w in weights.items():
        check_number(f"{key}.{name}", w, ge=0)
    if weights and sum(weights.values()) <= 0:
        raise SettingError(f"{key} sum to 0; give at least one member a positive weight (or null for uniform)")
    return weights


def check_name(name) -> str:
    """A name that becomes a file or folder name (run, backend, DLN system) cannot leave its
    folder: letters, digits, '_', '.' and '-', starting with a letter or digit, no '..'."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise SettingError(f"{name!r} is not a safe name: use letters, digits, '_', '.' and '-', starting "
                           f"with a letter or digit, without '/' or '..'")
    return name
