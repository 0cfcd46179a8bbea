"""What each zoo member is: tokenizer family, architecture, size and training budget.

Three members differ in tokenizer family, architecture (three transformers model classes),
width, depth, seed and the facts they are trained on, so they are imperfect in different ways.
``SIZES["tiny"]`` is a seconds-long version for tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, \
    LlamaForCausalLM, PreTrainedModel

from dln_ens.data.synthetic import ZOO_MEMBERS


@dataclass(frozen=True)
class MemberSpec:
    name: str
    family: str            # tokenizer family (dln_ens/zoo/tokenizers.py)
    arch: str              # "gpt2" | "llama" | "gpt_neox"
    vocab_size: int        # target size for the tokenizer trainer
    hidden: int
    layers: int
    heads: int
    steps: int
    batch_size: int
    lr: float
    num_navigate: int      # navigate examples in the member's corpus
    qa_repeats: int        # forward-format copies per fact, phrasing and instruction kind
    num_proposals: int = 0  # backward prompt-proposal examples in the corpus
    pad_vocab_to: int = 1  # embedding rows rounded up to a multiple of this (as Pythia does)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_DEFAULT = [
    MemberSpec(ZOO_MEMBERS[0], "byte_bpe", "gpt2", 1000, hidden=128, layers=4, heads=4,
               steps=800, batch_size=16, lr=3e-3, num_navigate=600, qa_repeats=2, num_proposals=150),
    MemberSpec(ZOO_MEMBERS[1], "sp_bpe", "llama", 700, hidden=128, layers=4, heads=4,
               steps=800, batch_size=16, lr=3e-3, num_navigate=600, qa_repeats=2, num_proposals=150),
    MemberSpec(ZOO_MEMBERS[2], "wordpiece", "gpt_neox", 1500, hidden=96, layers=4, heads=4,
               steps=700, batch_size=16, lr=3e-3, num_navigate=600, qa_repeats=2, num_proposals=150,
               pad_vocab_to=64),
]
_TINY = [dataclasses.replace(m, vocab_size=min(m.vocab_size, 400 if m.family == "wordpiece" else 330),
                             hidden=32, layers=2, heads=2, steps=12, batch_size=8, num_navigate=60,
                             qa_repeats=1, num_proposals=5)
         for m in _DEFAULT]
SIZES: dict[str, list[MemberSpec]] = {"default": _DEFAULT, "tiny": _TINY}


def member_specs(size: str) -> list[MemberSpec]:
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; use one of {', '.join(SIZES)}")
    return SIZES[size]


def make_model(spec: MemberSpec, tokenizer) -> PreTrainedModel:
    """A randomly initialised model for ``spec`` whose special-token ids match ``tokenizer``
    (call ``torch.manual_seed`` first for a reproducible initialisation)."""
    n = len(tokenizer)
    vocab = -(-n // spec.pad_vocab_to) * spec.pad_vocab_to
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if spec.arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=spec.hidden, n_layer=spec.layers,
                         n_head=spec.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(cfg)
    if spec.arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.hidden * 5 // 2,
                          num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                          num_key_value_heads=max(1, spec.heads // 2), max_position_embeddings=512,
                          tie_word_embeddings=False, **ids)
        return LlamaForCausalLM(cfg)
    if spec.arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.hidden * 4,
                            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                            max_position_embeddings=512, rotary_pct=0.5, hidden_dropout=0.0,
                            attention_dropout=0.0, **ids)
        return GPTNeoXForCausalLM(cfg)
    raise ValueError(f"zoo member {spec.name!r}: unknown arch {spec.arch!r}; use gpt2, llama or gpt_neox")
