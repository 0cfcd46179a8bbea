"""Shared fixtures: tiny causal LMs with their own trained tokenizers, saved like real checkpoints.

`tiny_gpt2_dir`: GPT-2 class, byte-level BPE tokenizer (no BOS added, EOS "<|endoftext|>").
`tiny_llama_dir`: Llama class, SentencePiece-style (Metaspace) BPE with byte fallback, adds BOS "<s>".
Both are random-init (hidden 32-48, 2 layers, vocab ~400) and saved with save_pretrained
(safetensors) in a session temp dir, so `HFLanguageModel.from_pretrained(dir)` loads them.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

# Tiny models: thread start-up and contention cost more than the matmuls (x50 on a busy 2-core
# box). Set DLN_ENS_TEST_THREADS to use more.
torch.set_num_threads(int(os.environ.get("DLN_ENS_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _leave_the_allocator_alone(monkeypatch):
    """Command-line entry points called in a test (`dln_ens.cli.main`) would change the C
    allocator's settings of the whole test process (`dln_ens.allocator`); tests of that switch
    set the variable themselves."""
    monkeypatch.setenv("DLN_ENS_KEEP_FREED_MEMORY", "0")

WORDS = ("yes no maybe answer input question the a of to is was cat dog red blue green left right "
         "step steps turn walk forward back true false one two three four five north south east west "
         "think thoughts correct because therefore").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        label = rng.choice(["Yes", "No", "(A)", "(B)"])
        lines.append(f"Classify the input.\n\nInput: {words}.\nAnswer: {label}\n")
    lines += ["Ünïcödé – ✓ 42 + 7 = 49!", "Let's think step by step."]
    return lines


def _gpt2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def _llama_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _save(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=48, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, initializer_range=0.2)
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("tiny-gpt2"), GPT2LMHeadModel(config), tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _llama_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.2)
    torch.manual_seed(1)
    return _save(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM(config), tokenizer)


@pytest.fixture(autouse=True)
def _task_registry_isolation():
    """A task a test registers inside its body is gone after it (module-level test tasks use
    `registered_tasks` in a module-scoped fixture)."""
    from dln_ens.data import registry
    registry._import_loaders()     # the built-in tasks first, so that restoring keeps them
    before = dict(registry._LOADERS)
    yield
    registry._LOADERS.clear()
    registry._LOADERS.update(before)
