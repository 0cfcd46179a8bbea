"""Context limits: what a backend does with an example longer than a member's context.

Each local model has a context limit (positions; by default its config's
``max_position_embeddings``) and a policy for examples that do not fit:

- ``"error"`` (the default): a `ContextLengthError` naming the example's index, the member and
  both lengths, before any model call (never an IndexError from the position table);
- ``"left"``: keep the example's end (its first token too when it is the BOS token), and count
  it in ``truncated`` so that an evaluation can report how many examples were cut.

An ensemble cuts the shared *text* on the left until every member's tokenisation fits, so that
all members still see the same text (`cut_text_left`).
"""
from __future__ import annotations

from typing import Callable

from dln_ens.errors import UserError

TRUNCATE = ("error", "left")


class ContextLengthError(UserError, ValueError):
    """``index``: of the example in the call; ``text``: the example (callers that batch or
    deduplicate requests find it by its text)."""

    def __init__(self, member: str, index: int, length: int, limit: int, what: str, where: str = "",
                 text: str | None = None):
        self.member, self.index, self.length, self.limit, self.what, self.where = member, index, length, limit, what, where
        self.text = text
        super().__init__(f"example {index}{f' of {where}' if where else ''}: {what} needs {length} positions in "
                         f"member {member!r}, whose context limit is {limit}; shorten the input (or lower "
                         f"max_new_tokens), or set \"truncate\": \"left\" on backend {member!r} to keep the "
                         f"end of long examples")

    def at(self, index: int, where: str = "") -> "ContextLengthError":
        """The same error for the example's index in a larger list (an evaluation's split)."""
        return ContextLengthError(self.member, index, self.length, self.limit, self.what, where or self.where, self.text)

    def within(self, texts: list[str], offset: int, where: str) -> "ContextLengthError":
        """Located among ``texts`` (the examples a caller sent, from ``offset`` on) by its text."""
        j = texts.index(self.text) if self.text in texts else self.index
        return self.at(offset + j, where)


def check_policy(truncate: str) -> str:
    from dln_ens.checks import SettingError
    if truncate not in TRUNCATE:
        raise SettingError(f"truncate must be one of {TRUNCATE}, got {truncate!r}")
    return truncate


def keep_end(ids: list[int], room: int, bos: int | None) -> list[int]:
    """The last ``room`` ids, keeping a leading BOS token in front when there was one."""
    if bos is not None and ids and ids[0] == bos and room >= 2:
        return [ids[0]] + ids[len(ids) - room + 1:]
    return ids[len(ids) - room:]


def cut_text_left(text: str, fits: Callable[[str], bool]) -> str | None:
    """The longest suffix of ``text`` with ``fits(suffix)`` (token counts shrink as the text
    does, up to tokenizer boundary effects, which the final linear step absorbs); None when
    even the empty suffix does not fit."""
    lo, hi = 0, len(text)          # fits(text[hi:]) is assumed; find the smallest cut
    if not fits(text[hi:]):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(text[mid:]):
            hi = mid
        else:
            lo = mid + 1
    while hi < len(text) and not fits(text[hi:]):
        hi += 1
    return text[hi:]
