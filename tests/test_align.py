"""Incremental re-tokenisation equals the tokenizer applied to the whole text, always."""
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dln_ens.ensemble.align import TokenTrack, visible_text
from dln_ens.relrep.vocab import token_surfaces
from dln_ens.zoo.tokenizers import train_byte_bpe, train_sp_bpe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
REAL = ["llama-spm", "gpt-2", "falcon", "deepseek-coder", "phi-3"]
PIECES = list("abcdefghij klmnop  \n\n\t.,!?'\"-0123456789") + [
    "é", "ü", "🙂", "中文", "  ", "\n", "ß", "🇫🇷", " the", "ing", "'s", "   ", "\r\n", " \n ", "ﬁ", "Führer", "𝔘"]
WORDS = "the quick brown fox jumps over lazy dog . , hello world from here on we go \n Then it said : 12 34 ( A ) Yes No".split(" ")


def is_char_prefix(tail: bytes) -> bool:
    """Can some continuation bytes complete ``tail`` into exactly one character?"""
    for x in (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF):
        for j in (1, 2, 3):
            try:
                if len((tail + bytes([x] * j)).decode("utf-8")) == 1:
                    return True
            except UnicodeDecodeError:
                pass
    return False


def slow_visible(data: bytes) -> str:
    """Valid UTF-8 whose last 1-3 bytes may be the start of a character: those are held back."""
    for k in (1, 2, 3):
        if len(data) >= k and is_char_prefix(data[len(data) - k:]):
            return data[:len(data) - k].decode("utf-8")
    return data.decode("utf-8")


def test_visible_text_holds_back_an_incomplete_character():
    smile = "🙂".encode()
    for k in range(len(smile)):
        assert visible_text(b"ab" + smile[:k]) == "ab"
    assert visible_text(b"ab" + smile) == "ab🙂"
    assert visible_text(b"a\xffb") == "a\ufffdb"          # never valid: replaced for good
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(6)).encode()
        cut = rng.randint(0, len(text))
        assert visible_text(text[:cut]) == slow_visible(text[:cut])
        assert text.decode().startswith(visible_text(text[:cut]))


def run_property(tok, seed, trials=40, steps=30, surfaces=None):
    rng = random.Random(seed)
    for _ in range(trials):
        start = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60)))
        track = TokenTrack(tok, start)
        data = start.encode()
        for _ in range(steps):
            if surfaces is not None and rng.random() < 0.5:   # a random token of the vocabulary
                piece = rng.choice(surfaces)
            else:
                piece = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3))).encode()
                if piece and rng.random() < 0.3:
                    piece = piece[:rng.randint(0, len(piece))]   # split inside a character
            data += piece
            text = visible_text(data)
            track.update(text)
            assert track.ids == tok(text)["input_ids"], (text[-60:], track.ids[-10:])
            assert track.text == text


@pytest.mark.parametrize("name", REAL)
def test_incremental_equals_full_on_real_tokenizers(name):
    if not (SHARED / name / "tokenizer.json").is_file():
        pytest.skip(f"{SHARED / name} absent")
    tok = AutoTokenizer.from_pretrained(SHARED / name)
    surfaces = [s for s in token_surfaces(tok) if s]
    run_property(tok, seed=hash(name) % 1000, trials=12, steps=25, surfaces=surfaces)


def test_incremental_equals_full_on_trained_tokenizers():
    rng = random.Random(5)
    texts = ["".join(rng.choice(PIECES) for _ in range(30)) for _ in range(300)]
    for tok in (train_byte_bpe(texts, 400), train_sp_bpe(texts, 500)):
        run_property(tok, seed=1, trials=15, steps=25, surfaces=[s for s in token_surfaces(tok) if s])


@pytest.mark.parametrize("name", ["trained-sp", "gpt-2", "phi-3", "llama-spm"])
def test_window_is_bounded_on_long_text(name):
    """Appending to a long text re-tokenises a window, never the whole text, with byte-level BPEs
    and with SentencePiece tokenizers whose normalizer prepends "▁" to every text it encodes
    (a window then starts with one token more than the text's own tokens there)."""
    if name == "trained-sp":
        rng = random.Random(5)
        tok = train_sp_bpe([" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(300)], 400)
    elif not (SHARED / name / "tokenizer.json").is_file():
        pytest.skip(f"{SHARED / name} absent")
    else:
        tok = AutoTokenizer.from_pretrained(SHARED / name)
    rng = random.Random(2)
    text = "".join(rng.choice(PIECES) for _ in range(2000))
    track = TokenTrack(tok, text, verify=True)
    for _ in range(50):
        text += rng.choice(PIECES)
        track.update(text)
    assert track.full_retokenisations <= 3   # the window, not the whole text, is re-tokenised
    text = " ".join(rng.choice(WORDS) for _ in range(300))   # running text, a word in two pieces
    track = TokenTrack(tok, text, verify=True)
    for _ in range(40):
        word = " " + rng.choice(WORDS)
        for piece in (word[:3], word[3:]):
            text += piece
            track.update(text)
    assert track.full_retokenisations <= 3
