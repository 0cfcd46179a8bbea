"""Three tokenizer families, trained with the `tokenizers` library, as real checkpoints ship them.

- ``byte_bpe``  (GPT-2 / GPT-NeoX style): byte-level BPE, "Ġ" marks a leading space, no BOS added.
- ``sp_bpe``    (Llama style): "▁" for spaces and one prepended, newlines split off, BPE with byte fallback ("<0x0A>"...), BOS added,
  the decoder strips the one space the pre-tokenizer prepends.
- ``wordpiece`` (BERT style vocabulary): "##" marks a word continuation; whitespace characters
  are tokens of their own so that decoding is exact (plain BERT loses spacing); BOS added.

Each is wrapped as a ``PreTrainedTokenizerFast`` with bos/eos/pad/unk set. decode(encode(t))
returns t exactly for any printable-ASCII text with newlines (byte_bpe and sp_bpe for any text);
tests/test_zoo.py checks it on the corpus.
"""
from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("byte_bpe", "sp_bpe", "wordpiece")
ASCII = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
NUM_BYTES = 256


def _wrap(tok: Tokenizer, add_bos: bool, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, add_bos_token=add_bos, add_eos_token=False,
                                   clean_up_tokenization_spaces=False, **special)


def _with_vocab(tok: Tokenizer, vocab: dict[str, int]) -> Tokenizer:
    """Rebuild ``tok`` with a new vocabulary (same merges, normaliser, pre-tokeniser, decoder)."""
    data = json.loads(tok.to_str())
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [dict(a, id=vocab[a["content"]]) for a in data["added_tokens"]]
    return Tokenizer.from_str(json.dumps(data))


def train_byte_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eot = "<|endoftext|>"
    return _wrap(tok, add_bos=False, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def train_sp_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # sentencepiece's way: one "▁" before the text and for every space, always (so a text that
    # starts with a space round-trips); words are split before a "▁" and around newlines
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.Split("▁", behavior="merged_with_next")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [c if c != " " else "▁" for c in ASCII]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - NUM_BYTES, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # Llama layout: specials, then the 256 byte-fallback tokens <0x00>..<0xFF>, then the pieces
    learned = sorted(((t, i) for t, i in tok.get_vocab(with_added_tokens=False).items() if t not in specials),
                     key=lambda ti: ti[1])
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(NUM_BYTES)})
    vocab.update({t: len(vocab) + k for k, (t, _) in enumerate(learned)})
    tok = _with_vocab(tok, vocab)
    return _wrap(tok, add_bos=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def train_wordpiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    split_words = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
                                           pre_tokenizers.Punctuation(behavior="isolated")])
    # The pieces come from a plain BPE run, each both word-initial and as a "##" continuation:
    # tokenizers' WordPieceTrainer breaks ties differently from run to run (not reproducible).
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = split_words
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size // 2, initial_alphabet=ASCII,
                                                       show_progress=False))
    pieces = sorted(bpe.get_vocab().items(), key=lambda ti: ti[1])
    vocab = {t: i for i, t in enumerate(specials)}
    # WordPiece maps a whole word to [UNK] when one piece is missing: every printable character
    # must exist both word-initially and as a continuation.
    for piece in [t for t, _ in pieces] + ASCII:
        vocab.setdefault(piece, len(vocab))
    for piece in [t for t, _ in pieces] + ASCII:
        if piece.isalnum():
            vocab.setdefault(f"##{piece}", len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = split_words
    # tokens are concatenated as they are: spaces and newlines are tokens, "##" only marks continuation
    tok.decoder = decoders.Sequence([decoders.Replace(Regex("^##"), ""), decoders.Fuse()])
    return _wrap(tok, add_bos=True, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]")


TRAINERS = {"byte_bpe": train_byte_bpe, "sp_bpe": train_sp_bpe, "wordpiece": train_wordpiece}


def train_tokenizer(family: str, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    if family not in TRAINERS:
        raise ValueError(f"unknown tokenizer family {family!r}; use one of {', '.join(FAMILIES)}")
    return TRAINERS[family](texts, vocab_size)
