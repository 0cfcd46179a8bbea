"""Token surfaces: a tokenisation's surfaces concatenate to the text's bytes, on real and
trained tokenizers of every family."""
import pytest

from relrep_helpers import (SHARED, mixed_texts, train_byte_bpe, train_metaspace_bpe,
                            train_metaspace_unigram, train_wordpiece, word_level)
from dln_ens.relrep.vocab import token_surfaces

REAL = ["llama-spm", "phi-3", "gpt-2", "falcon", "deepseek-coder"]


def _encode(tok, text):
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _concat(surfaces, ids):
    assert all(surfaces[i] is not None for i in ids), "a text token has no surface"
    return b"".join(surfaces[i] for i in ids)


def _check_decode_consistency(tok, surfaces, ids, metaspace):
    # what transformers itself prints for these ids (lossy utf-8), modulo the text's first space
    got = _concat(surfaces, ids).decode("utf-8", errors="replace")
    want = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if metaspace and got.startswith(" "):
        got = got[1:]
    assert got == want


def _expected(text: str, metaspace: bool) -> set[bytes]:
    """The text's bytes up to the documented normalisation: SentencePiece reads "\u2581" as a
    space and prepends one space to a non-empty text (the Metaspace pre-tokenizer skips that
    when the text already starts with one; a Prepend normaliser does not)."""
    if not metaspace or not text:
        return {text.encode()}
    t = text.replace("\u2581", " ").encode()
    return {b" " + t, t} if t.startswith(b" ") else {b" " + t}


def _metaspace(tok) -> bool:
    import json
    return "\u2581" in json.dumps(json.loads(tok.backend_tokenizer.to_str())["decoder"], ensure_ascii=False)


@pytest.mark.parametrize("name", REAL)
def test_real_tokenizers_round_trip(name):
    path = SHARED / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"{path} absent")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    surfaces = token_surfaces(tok)
    assert len(surfaces) == len(tok)
    assert all(surfaces[i] is None for i in tok.all_special_ids)
    metaspace = _metaspace(tok)
    # added non-special single characters (deepseek's "ü") decode through the byte-level map
    quirky = {i for i, a in tok.backend_tokenizer.get_added_tokens_decoder().items()
              if not a.special and len(a.content) == 1}
    checked = 0
    for text in mixed_texts(80, seed=1):
        ids = _encode(tok, text)
        _check_decode_consistency(tok, surfaces, ids, metaspace)
        if quirky & set(ids):
            continue
        assert _concat(surfaces, ids) in _expected(text, metaspace), (name, text)
        checked += 1
    assert checked > 60


def test_deepseek_added_byte_character_follows_the_decoder():
    path = SHARED / "tokenizers" / "deepseek-coder"
    if not path.is_dir():
        pytest.skip(f"{path} absent")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    surfaces = token_surfaces(tok)
    ids = _encode(tok, "Führer")
    assert _concat(surfaces, ids) == b"F\xfchrer"
    assert tok.decode(ids) == "F\ufffdhrer"


@pytest.mark.parametrize("train", [train_byte_bpe, train_metaspace_bpe, train_metaspace_unigram])
def test_trained_tokenizers_round_trip(train):
    tok = train()
    surfaces = token_surfaces(tok)
    metaspace = _metaspace(tok)
    for text in mixed_texts(60, seed=2):
        ids = _encode(tok, text)
        assert _concat(surfaces, ids) in _expected(text, metaspace), text
        _check_decode_consistency(tok, surfaces, ids, metaspace)


def test_byte_fallback_and_byte_level_tokens():
    bpe, sp = train_byte_bpe(), train_metaspace_bpe()
    s_bpe, s_sp = token_surfaces(bpe), token_surfaces(sp)
    vocab_bpe, vocab_sp = bpe.get_vocab(), sp.get_vocab()
    assert s_sp[vocab_sp["<0x0A>"]] == b"\n" and s_sp[vocab_sp["<0xFC>"]] == b"\xfc"
    assert s_bpe[vocab_bpe["Ċ"]] == b"\n" and s_bpe[vocab_bpe["ü"]] == b"\xfc" and s_bpe[vocab_bpe["Ġ"]] == b" "
    assert s_sp[vocab_sp["<s>"]] is None and s_bpe[vocab_bpe["<|endoftext|>"]] is None


def test_wordpiece_words_are_space_prefixed_and_continuations_bare():
    tok = train_wordpiece()
    surfaces = token_surfaces(tok)
    pre = tok.backend_tokenizer.pre_tokenizer
    for text in mixed_texts(60, seed=3):
        ids = _encode(tok, text)
        if tok.unk_token_id in ids:
            continue
        words = [w for w, _ in pre.pre_tokenize_str(text)]
        assert _concat(surfaces, ids) == b"".join(b" " + w.encode() for w in words), text
    vocab = tok.get_vocab()
    cont = next(t for t in vocab if t.startswith("##") and len(t) > 2)
    assert surfaces[vocab[cont]] == cont[2:].encode()


def test_plain_vocabulary_and_cache():
    tok = word_level(["alpha", "beta"])
    s = token_surfaces(tok)
    assert s == [None, b"alpha", b"beta"]
    assert token_surfaces(tok) is s
