"""Token texts, character offsets and the ``logprobs`` block of a completions choice (pure).

Each token's text is made of the characters whose first byte it holds, so a character split
across tokens appears once, on the token where it starts, and the tokens holding its other bytes
have empty text. ``text_offset`` counts characters of ``"".join(tokens)`` (vLLM's convention);
special tokens (BOS, EOS) have empty text.
"""
from __future__ import annotations


def _char_start(data: bytes, i: int) -> int:
    """The first byte at or after ``i`` that starts a UTF-8 character (or the end)."""
    while i < len(data) and (data[i] & 0xC0) == 0x80:
        i += 1
    return i


def token_texts(pieces: list[bytes]) -> list[str]:
    data = b"".join(pieces)
    out, pos = [], 0
    for p in pieces:
        a, b = _char_start(data, pos), _char_start(data, pos + len(p))
        out.append(data[a:b].decode("utf-8", errors="replace") if b > a else "")
        pos += len(p)
    return out


def text_offsets(texts: list[str]) -> list[int]:
    out, pos = [], 0
    for t in texts:
        out.append(pos)
        pos += len(t)
    return out


def logprobs_block(texts: list[str], ids: list[int], lps: list, tops: list, piece) -> dict:
    """``choices[].logprobs``: ``tops[i]`` is None (no distribution: the prompt's first token) or
    {token id: log-prob} of the top tokens; the chosen token is always in ``top_logprobs`` (as in
    vLLM). ``piece(id)`` is a token's surface bytes."""
    top_out = []
    for tok, lp, top in zip(ids, lps, tops):
        if top is None or lp is None:
            top_out.append(None)
            continue
        entry: dict[str, float] = {}
        for t, v in [*top.items(), (tok, lp)]:
            key = piece(t).decode("utf-8", errors="replace")
            entry[key] = max(v, entry.get(key, float("-inf")))
        top_out.append(entry)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top_out, "text_offset": text_offsets(texts)}
