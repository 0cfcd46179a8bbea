"""Token surfaces: the exact bytes each token id contributes to text.

Anchors are tokens with the same surface in every member, so surfaces must follow what each
tokenizer actually decodes, per token, without looking at neighbours. The family is read from
the backend's decoder (tokenizer.json), never from the model's name:

- byte-level BPE (decoder ``ByteLevel``): every character of the token maps through GPT-2's
  byte-to-unicode table (``Ġ`` = 0x20, ``Ċ`` = 0x0A, ``Ã©`` = C3 A9). A token holding a
  character outside that table (an added token such as ``" hello"``) decodes to its raw UTF-8
  bytes, exactly as the Rust decoder does. Consequence, on purpose: deepseek-coder's added
  token ``ü`` *is* in the table and decodes to the lone byte 0xFC (transformers prints
  ``F�hrer``), so its surface is ``b"\\xfc"``, not the UTF-8 of "ü".
- SentencePiece (``Metaspace`` decoder, or a ``Sequence`` of ``Replace("▁", " ")``,
  ``ByteFallback``, ``Fuse``, ``Strip``): ``▁`` is a space; ``<0xNN>`` is the byte NN (the
  ``ByteFallback`` decoder converts such tokens whatever the model's flag). The ``Strip``/``prepend_scheme`` removal of the *text's* first
  space depends on position, not on the token, and is ignored: a tokenisation of ``"Hi"``
  concatenates to ``b" Hi"`` (SentencePiece's prefix space).
- WordPiece (``WordPiece`` decoder): ``##x`` continues a word and contributes ``b"x"``; a
  word-initial token ``x`` contributes ``b" x"``, the space the decoder puts between words
  (so "the" matches GPT-2's ``Ġthe`` and Llama's ``▁the``; at the very start of a text that
  space is an artefact, like SentencePiece's prefix space). Punctuation is word-initial in
  BERT pre-tokenisation, so "," is ``b" ,"``; the decoder's ``cleanup`` is ignored.
- ``Replace`` steps (string or regex, e.g. the zoo's WordPiece-style ``Replace(^##, "")``)
  apply to each token, as in the Rust decoder.
- ``BPEDecoder`` (suffix, e.g. ``</w>``): the suffix is a space after the token.
- no decoder: the token's UTF-8 bytes (a plain vocabulary).

Special tokens (added tokens flagged ``special`` and the tokenizer's ``all_special_ids``) get
``None``, and so do ids without a token. Any other decoder is an error, never a guess.
"""
from __future__ import annotations

import json
import re
import weakref
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it encodes (the ``bytes_to_unicode``
    table every byte-level BPE uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (or the object itself)."""
    for attr in ("backend_tokenizer", "_tokenizer"):
        b = getattr(tokenizer, attr, None)
        if b is not None and hasattr(b, "to_str"):
            return b
    if hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):
        return tokenizer
    raise TypeError(f"{type(tokenizer).__name__}: token surfaces need a fast tokenizer backed by the "
                    f"`tokenizers` library (tokenizer.json); load it with AutoTokenizer (use_fast=True) "
                    f"or convert the slow tokenizer once with save_pretrained from a fast one")


def _special_ids(tokenizer, backend) -> set[int]:
    ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    ids.update(i for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None)
    return ids


def _steps(decoder: dict | None, model: dict) -> list[dict]:
    """The decoder as a flat list of per-token steps (position-dependent ones dropped)."""
    if decoder is None:
        return []
    kind = decoder["type"]
    if kind == "Sequence":
        out, fused = [], False
        for d in decoder["decoders"]:
            if d["type"] == "Fuse":
                fused = True  # later steps see the whole text: a Strip there is positional
                continue
            if d["type"] == "Strip" and fused:
                continue
            out.extend(_steps(d, model))
        return out
    if kind in ("ByteLevel", "ByteFallback", "Fuse"):
        return [] if kind == "Fuse" else [{"type": kind}]
    if kind == "Metaspace":
        return [{"type": "Replace", "from": decoder.get("replacement", "▁"), "to": " "}]
    if kind == "Replace":
        pat = decoder["pattern"]
        if "Regex" in pat:  # Rust regex; the simple patterns decoders use read the same in Python
            return [{"type": "ReplaceRegex", "from": re.compile(pat["Regex"]), "to": decoder["content"]}]
        return [{"type": "Replace", "from": pat["String"], "to": decoder["content"]}]
    if kind == "Strip":
        return [{"type": "Strip", "content": decoder["content"], "start": decoder["start"],
                 "stop": decoder["stop"]}]
    if kind == "WordPiece":
        return [{"type": "WordPiece", "prefix": decoder.get("prefix", "##")}]
    if kind == "BPEDecoder":
        return [{"type": "BPEDecoder", "suffix": decoder.get("suffix", "</w>")}]
    raise ValueError(f"token surfaces: decoder type {kind!r} is not supported (supported: ByteLevel, "
                     f"Metaspace, WordPiece, BPEDecoder, Replace/ByteFallback/Fuse/Strip sequences); "
                     f"add it to dln_ens/relrep/vocab.py")


def _surface(token: str, steps: list[dict], byte_map: dict[str, int]) -> bytes:
    piece: str | bytes = token
    for s in steps:
        if isinstance(piece, bytes):
            break  # a byte token is final: later string steps cannot apply to raw bytes
        kind = s["type"]
        if kind == "Replace":
            piece = piece.replace(s["from"], s["to"])
        elif kind == "ReplaceRegex":
            piece = s["from"].sub(s["to"].replace("\\", "\\\\"), piece)
        elif kind == "ByteFallback":
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:  # the decoder converts any <0xNN> token, whatever the model's flag says
                piece = bytes([int(m.group(1), 16)])
        elif kind == "ByteLevel":
            try:
                piece = bytes([byte_map[c] for c in piece])
            except KeyError:  # outside the alphabet: the decoder keeps the raw UTF-8
                piece = piece.encode("utf-8")
        elif kind == "Strip":
            c = s["content"]
            for _ in range(s["start"]):
                if piece.startswith(c):
                    piece = piece[len(c):]
            for _ in range(s["stop"]):
                if piece.endswith(c):
                    piece = piece[:-len(c)]
        elif kind == "WordPiece":
            p = s["prefix"]
            piece = piece[len(p):] if piece.startswith(p) else " " + piece
        elif kind == "BPEDecoder":
            suf = s["suffix"]
            piece = piece[:-len(suf)] + " " if piece.endswith(suf) else piece
    return piece if isinstance(piece, bytes) else piece.encode("utf-8")


def token_surfaces(tokenizer) -> list[bytes | None]:
    """``surfaces[i]`` = the bytes token id i contributes to text (``None``: special token or
    no token), for every id in ``0 .. len(tokenizer) - 1``. Cached per tokenizer object."""
    try:
        hit = _cache.get(tokenizer)
    except TypeError:
        hit = None
    backend = _backend(tokenizer)
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else backend.get_vocab_size(with_added_tokens=True)
    if hit is not None and len(hit) == n:
        return hit
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    steps = _steps(spec.get("decoder"), model)
    byte_map = byte_level_alphabet()
    special = _special_ids(tokenizer, backend)
    out: list[bytes | None] = [None] * n
    # added tokens go through the decoder too (the Rust decoder sees them as plain tokens)
    for tok, i in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= i < n and i not in special:
            out[i] = _surface(tok, steps, byte_map)
    try:
        _cache[tokenizer] = out
    except TypeError:
        pass
    return out
