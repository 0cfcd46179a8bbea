"""Tokenizers trained on the fly and tiny models for the relrep tests."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED = Path(__file__).resolve().parents[2] / "shared"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
    "Question: what is 12 + 30?\nAnswer: 42", "def f(x):\n\treturn x * 2  # double",
    "Naïve café owners in Zürich drink crème brûlée; 東京 is big. 😀🎉",
    "Numbers 0123456789 and more 3.14159 2024-11-25", "tabs\tand  double  spaces   here",
    "Anchors are tokens shared by every vocabulary.", "the then there their they them",
]


def mixed_texts(n: int = 40, seed: int = 0) -> list[str]:
    """Fixed hard cases plus random mixes of unicode, emoji, space runs, newlines, tabs, digits."""
    pool = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`") \
        + ["é", "ü", "ß", "ñ", "Ω", "東", "京", "한", "😀", "🎉", "👍🏽", "\u200b", " ", "  ", "   ", "\n", "\n\n", "\t", " \t "]
    words = ["the", "hello", "world", "Führer", "naïve", "café", "1234", "42", "anchor", "token", "▁x", "Ġy", "##z"]
    rng = random.Random(seed)
    out = ["", " ", "  leading", "trailing  ", "\n", "a\nb", "x\t\ty", "   three", "Führer", "ü", "😀", "12345678901234",
           " hello world", "hello  world\n\tdone"] + CORPUS
    while len(out) < n:
        parts = [rng.choice(words) if rng.random() < 0.4 else rng.choice(pool) for _ in range(rng.randint(1, 12))]
        out.append("".join(p if rng.random() < 0.5 else p + " " for p in parts))
    return out


def _wrap(tok: Tokenizer, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)


def train_byte_bpe(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return _wrap(tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def train_metaspace_bpe(vocab_size: int = 500) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + _byte_tokens(),
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"), show_progress=False))
    # the byte tokens are ordinary pieces (as in Llama), not special ones
    data = json.loads(tok.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] in ("<unk>", "<s>", "</s>")]
    return _wrap(Tokenizer.from_str(json.dumps(data)), unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def train_metaspace_unigram(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS * 3, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>"], unk_token="<unk>", show_progress=False,
        initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz")))
    data = json.loads(tok.to_str())
    have = {p for p, _ in data["model"]["vocab"]}
    data["model"]["vocab"] += [[b, -30.0] for b in _byte_tokens() if b not in have]
    data["model"]["byte_fallback"] = True
    return _wrap(Tokenizer.from_str(json.dumps(data)), unk_token="<unk>", bos_token="<s>")


def train_wordpiece(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.train_from_iterator(CORPUS * 3 + mixed_texts(), trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    return _wrap(tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def word_level(words: list[str]) -> PreTrainedTokenizerFast:
    """A plain vocabulary (no decoder)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(tok, unk_token="[UNK]")


def tiny_member(tokenizer, extra_rows: int = 3, d: int = 32, seed: int = 0, tied: bool = True,
                dtype=torch.float32) -> SimpleNamespace:
    """A random tiny Llama whose embedding has a few rows beyond the tokenizer (as real
    checkpoints pad their vocabulary), wrapped like an HFLanguageModel."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer) + extra_rows, hidden_size=d, intermediate_size=2 * d,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # structure like trained embeddings: low rank plus noise
        w = model.get_input_embeddings().weight
        V = w.shape[0]
        w.copy_((torch.randn(V, 4) @ torch.randn(4, d) + 0.3 * torch.randn(V, d)).to(dtype))
    return SimpleNamespace(model=model, tokenizer=tokenizer)


def save_members(root: Path) -> dict[str, Path]:
    """Two tiny checkpoints with different tokenizers saved like real ones: {"a": dir, "b": dir}."""
    out = {}
    for name, tok, seed in (("a", train_byte_bpe(), 1), ("b", train_metaspace_bpe(), 2)):
        m = tiny_member(tok, seed=seed)
        m.model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out
