"""Keeping every member's token ids equal to its tokenizer applied to the shared text.

The shared text of a sequence grows by the surface *bytes* of each token the main member
emits. It is kept as bytes: a byte-fallback token (``<0xF0>``) or a byte-level BPE piece may
carry part of a UTF-8 character, and only the bytes concatenate correctly.

Incomplete UTF-8 at the tail. A tokenisation of text that ends inside a character is ill-defined
(tokenizers take str). `visible_text` decodes the longest prefix that ends on a character
boundary and *holds back* an incomplete trailing sequence (at most 3 bytes); other members see
the character once its last byte has arrived. Bytes that can never form a character decode to
U+FFFD, permanently, the way ``bytes.decode(errors="replace")`` does.

`TokenTrack` holds one member's ids for one sequence, always equal to ``tokenizer(text)``
(with its default special tokens, i.e. ``member.encode(text)``), and updates them when the
text changes by re-tokenising a bounded tail: a window of the last few tokens' text plus the
new text, tokenised together with a few tokens of left context. The window's tokens replace
the old ones from a token boundary c0 on, only if the boundary is *stable*: the window's
tokenisation has a boundary at c0 and reproduces the old context tokens just before it (all
but the window's first token, which may differ because tokenizers treat a text's start
specially, e.g. SentencePiece's prefix space). Otherwise the window and context double, up to
a full re-tokenisation. ``verify=True`` also compares every update with the full
re-tokenisation and raises on a difference (tests).
"""
from __future__ import annotations

import codecs
from bisect import bisect_left

from dln_ens.lm.batching import common_prefix


def visible_text(data: bytes) -> str:
    """The text members see: ``data`` decoded, an incomplete trailing character held back."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def final_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class TokenTrack:
    """ids == tokenizer(text) for one member and one sequence, with each token's char span."""

    def __init__(self, tokenizer, text: str, window: int = 4, context: int = 2, verify: bool = False,
                 name: str = "member"):
        self.tokenizer, self.window, self.context, self.verify, self.name = tokenizer, window, context, verify, name
        self.full_retokenisations = 0
        self._full(text)

    def _encode(self, text: str, special: bool):
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _full(self, text: str) -> None:
        ids, offs = self._encode(text, True)
        # leading special tokens (BOS) carry no text: they never change and never start a window
        ns = 0
        while ns < len(ids) and offs[ns] == (0, 0) and ids[ns] in self.tokenizer.all_special_ids:
            ns += 1
        if any(o == (0, 0) and i in self.tokenizer.all_special_ids for i, o in zip(ids[ns:], offs[ns:])) and text:
            raise ValueError(f"{self.name}: the tokenizer adds special tokens after the text (e.g. EOS); "
                             f"an ensemble member must encode a prefix without them (set add_eos_token=False)")
        self.text, self.ids, self.offsets, self.num_special = text, ids, offs, ns
        self.full_retokenisations += 1

    def update(self, text: str) -> int:
        """Re-tokenise for the new text; returns how many of the old ids are kept (the rest,
        ``ids[keep:]``, must be fed to the model after rolling its cache back to ``keep``)."""
        if text == self.text:
            return len(self.ids)
        old = self.ids
        changed = common_prefix(self.text, text)
        self.last_start = None
        first_touched = max(self.num_special, bisect_left(self.offsets, changed, lo=self.num_special,
                                                          key=lambda o: o[1]))
        window, context = self.window, self.context
        while True:
            if self._try_window(text, first_touched - window, context):
                break
            if first_touched - window - context <= self.num_special:
                self._full(text)
                break
            window, context = window * 2, context * 2
        if self.verify:
            full, _ = self._encode(text, True)
            if full != self.ids:
                raise RuntimeError(f"{self.name}: incremental re-tokenisation differs from the full one for "
                                   f"{text[-80:]!r}: {self.ids[-12:]} != {full[-12:]}")
        start = self.last_start if self.last_start is not None else 0   # ids before it are unchanged
        return start + common_prefix(old[start:], self.ids[start:])

    def _boundary(self, j: int) -> int:
        """The nearest token index <= j that starts on a character boundary (not inside the span
        of the previous token, as the byte pieces of one character share their span)."""
        while j > self.num_special and self.offsets[j][0] < self.offsets[j - 1][1]:
            j -= 1
        return j

    def _try_window(self, text: str, j0: int, context: int) -> bool:
        if j0 - context <= self.num_special:
            return False
        j0 = self._boundary(j0)
        jc = self._boundary(j0 - context)
        if jc <= self.num_special or jc >= j0:
            return False
        c0, cc = self.offsets[j0][0], self.offsets[jc][0]
        w_ids, w_offs = self._encode(text[cc:], False)
        w_offs = [(a + cc, b + cc) for a, b in w_offs]
        k = 0
        while k < len(w_ids) and w_offs[k][0] < c0:
            k += 1
        if k < 2 or (k < len(w_ids) and w_offs[k][0] != c0) or w_offs[k - 1][1] > c0:
            return False
        if w_ids[1:k] != self.ids[jc + 1:j0] or w_offs[1:k] != self.offsets[jc + 1:j0]:
            return False
        self.text, self.last_start = text, j0
        self.ids = self.ids[:j0] + w_ids[k:]
        self.offsets = self.offsets[:j0] + w_offs[k:]
        return True
