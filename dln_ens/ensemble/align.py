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


def encode_with_offsets(tokenizer, texts: list[str], special: bool) -> list[tuple[list[int], list]]:
    """(ids, char spans) of each text, in one batched tokenizer call: ``tokenizer(texts)``, or
    its Rust backend directly where that is all ``tokenizer(texts)`` would run (`_plain_backend`;
    the per-text conversion to Python lists costs more than the tokenisation of a short tail)."""
    if not texts:
        return []
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(list(texts), add_special_tokens=special)]
    enc = tokenizer(list(texts), add_special_tokens=special, return_offsets_mapping=True)
    return [(list(i), [tuple(o) for o in offs]) for i, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def _plain_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer whose call is exactly its
    ``encode_batch`` (no method of the call path overridden, no truncation, padding or special
    token splitting set); else None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls, backend = type(tokenizer), getattr(tokenizer, "_tokenizer", None)
    if not isinstance(tokenizer, TokenizersBackend) or backend is None:
        return None
    path = ("__call__", "_get_padding_truncation_strategies", "_encode_plus", "set_truncation_and_padding")
    if any(getattr(cls, m, None) is not getattr(TokenizersBackend, m, None) for m in path) \
            or hasattr(tokenizer, "_switch_to_input_mode"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


class TokenTrack:
    """ids == tokenizer(text) for one member and one sequence, with each token's char span.
    ``encoding`` (ids, offsets) of ``tokenizer(text)`` skips the first tokenisation."""

    def __init__(self, tokenizer, text: str, window: int = 4, context: int = 2, verify: bool = False,
                 name: str = "member", encoding: tuple[list[int], list] | None = None):
        self.tokenizer, self.window, self.context, self.verify, self.name = tokenizer, window, context, verify, name
        self.full_retokenisations = 0
        self.last_start = None
        self._full(text, encoding)

    def _encode(self, text: str, special: bool):
        return encode_with_offsets(self.tokenizer, [text], special)[0]

    def _full(self, text: str, encoding=None) -> None:
        ids, offs = self._encode(text, True) if encoding is None else encoding
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
        return update_many([self], [text])[0]

    def _first_touched(self, text: str) -> int:
        changed = common_prefix(self.text, text)
        return max(self.num_special, bisect_left(self.offsets, changed, lo=self.num_special, key=lambda o: o[1]))

    def _boundary(self, j: int) -> int:
        """The nearest token index <= j that starts on a character boundary (not inside the span
        of the previous token, as the byte pieces of one character share their span)."""
        while j > self.num_special and self.offsets[j][0] < self.offsets[j - 1][1]:
            j -= 1
        return j

    def _window(self, j0: int, context: int):
        """(j0, jc): re-tokenise from token jc's start, replace the tokens from j0 on; None when
        the window reaches the text's start."""
        if j0 - context <= self.num_special:
            return None
        j0 = self._boundary(j0)
        jc = self._boundary(j0 - context)
        if jc <= self.num_special or jc >= j0:
            return None
        return j0, jc

    def _accept(self, text: str, j0: int, jc: int, w_ids: list[int], w_offs) -> bool:
        """Take the window's tokenisation (of ``text[cc:]``) if its boundary at token j0 is stable:
        its tokens just before that boundary are tokens jc+1 .. j0-1, ids and spans, and it has
        at least one token before them. That start is not compared: a tokenizer may tokenise a
        text's beginning differently (SentencePiece normalizers prepend "▁" to every text they
        encode, so the window can start with an extra token)."""
        c0, cc = self.offsets[j0][0], self.offsets[jc][0]
        w_offs = [(a + cc, b + cc) for a, b in w_offs]
        k = 0
        while k < len(w_ids) and w_offs[k][0] < c0:
            k += 1
        s = k - (j0 - jc - 1)   # where tokens jc+1 .. j0-1 must sit in the window
        if s < 1 or (k < len(w_ids) and w_offs[k][0] != c0) or w_offs[k - 1][1] > c0:
            return False
        if w_ids[s:k] != self.ids[jc + 1:j0] or w_offs[s:k] != self.offsets[jc + 1:j0]:
            return False
        self.text, self.last_start = text, j0
        self.ids = self.ids[:j0] + w_ids[k:]
        self.offsets = self.offsets[:j0] + w_offs[k:]
        return True


def update_many(tracks: list[TokenTrack], texts: list[str]) -> list[int]:
    """``tracks[i].update(texts[i])`` for every i (all tracks of one tokenizer), with one batched
    tokenizer call per round of windows (a window that fails doubles, as in ``update``) and one
    for the texts that need a full re-tokenisation. Returns the kept counts."""
    if not tracks:
        return []
    tok = tracks[0].tokenizer
    keep = [len(tr.ids) for tr in tracks]
    old = {}
    jobs, full = [], []   # job: [track index, first touched token, window, context]
    for i, (tr, text) in enumerate(zip(tracks, texts)):
        if text != tr.text:
            old[i], tr.last_start = tr.ids, None
            jobs.append([i, tr._first_touched(text), tr.window, tr.context])
    while jobs:
        asks = [(job, tracks[job[0]]._window(job[1] - job[2], job[3])) for job in jobs]
        windows = [(job, w) for job, w in asks if w is not None]
        encs = encode_with_offsets(tok, [texts[job[0]][tracks[job[0]].offsets[w[1]][0]:] for job, w in windows],
                                   False)
        accepted = set()
        for (job, (j0, jc)), (w_ids, w_offs) in zip(windows, encs):
            if tracks[job[0]]._accept(texts[job[0]], j0, jc, w_ids, w_offs):
                accepted.add(id(job))
        retry = []
        for job in jobs:
            if id(job) in accepted:
                continue
            if job[1] - job[2] - job[3] <= tracks[job[0]].num_special:
                full.append(job)
            else:
                job[2], job[3] = job[2] * 2, job[3] * 2
                retry.append(job)
        jobs = retry
    for job, encoding in zip(full, encode_with_offsets(tok, [texts[job[0]] for job in full], True)):
        tracks[job[0]]._full(texts[job[0]], encoding)
    for i, before in old.items():
        tr = tracks[i]
        if tr.verify:
            want, _ = tr._encode(texts[i], True)
            if want != tr.ids:
                raise RuntimeError(f"{tr.name}: incremental re-tokenisation differs from the full one for "
                                   f"{texts[i][-80:]!r}: {tr.ids[-12:]} != {want[-12:]}")
        start = tr.last_start or 0   # ids before it are unchanged
        keep[i] = start + common_prefix(before[start:], tr.ids[start:])
    return keep
