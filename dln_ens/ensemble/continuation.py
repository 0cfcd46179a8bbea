"""A member's tokenisation of a piece of text as the continuation of running text.

Tokenizers treat the start of a text specially (SentencePiece prepends "▁", BPE merges differ at
the start), so a surface is tokenised after a short marker: ids = encode(marker + text) with the
ids of encode(marker) removed from the front, accepted only when the remaining tokens' surfaces
(`relrep.vocab.token_surfaces`) are exactly the text's bytes. Markers are tried in turn (one may
merge with the text); a text no marker works for (or that is not valid UTF-8 and is not one token)
gives [] (the member cannot produce it on its own).
"""
from __future__ import annotations

MARKERS = ("\n", ".", " ", "a")


class Continuations:
    def __init__(self, tokenizer, surfaces: list[bytes | None]):
        self.tokenizer, self.surfaces = tokenizer, surfaces
        self.exact = {}
        for i, s in enumerate(surfaces):
            if s:
                self.exact.setdefault(s, i)
        self._marker_ids = {m: self._encode(m) for m in MARKERS}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _spells(self, ids: list[int], data: bytes) -> bool:
        got = [self.surfaces[i] if i < len(self.surfaces) else None for i in ids]
        return all(got) and b"".join(got) == data

    def __call__(self, data: bytes) -> list[int]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return [self.exact[data]] if data in self.exact else []
        for marker, head in self._marker_ids.items():
            ids = self._encode(marker + text)
            if ids[:len(head)] == head and self._spells(ids[len(head):], data):
                return ids[len(head):]
        return []
