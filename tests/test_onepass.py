"""Where the one-pass ensemble score reads each member's distribution (`ensemble.onepass`):
always after exactly the member's tokenisation of the prefix text, and off the pair's one
sequence whenever that tokenisation is a prefix of it. References: the tokenizer on each text."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dln_ens.ensemble.align import TokenTrack, update_many, visible_text
from dln_ens.ensemble.onepass import member_reads, prefix_texts
from dln_ens.relrep.vocab import token_surfaces
from dln_ens.zoo.tokenizers import train_byte_bpe, train_sp_bpe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
PIECES = list("abcdefgh ij  \n.,!?'-0123") + ["é", "🙂", "中文", " the", "ing", "'s", "\r\n", "Führer"]


def trained():
    rng = random.Random(5)
    texts = ["".join(rng.choice(PIECES) for _ in range(30)) for _ in range(300)]
    return {"bpe": train_byte_bpe(texts, 400), "sp": train_sp_bpe(texts, 500)}


def real(names):
    out = {}
    for n in names:
        if (SHARED / n / "tokenizer.json").is_file():
            out[n] = AutoTokenizer.from_pretrained(SHARED / n)
    return out


def pairs(main_tok, rng, n=6):
    """(context, prefix texts) with the main tokenizer's tokens of a random target as steps."""
    surf = token_surfaces(main_tok)
    out = []
    for _ in range(n):
        ctx = "".join(rng.choice(PIECES) for _ in range(rng.randint(3, 20)))
        tgt = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
        ids = main_tok(ctx + tgt, add_special_tokens=False)["input_ids"]
        out.append((ctx, prefix_texts(ctx, [surf[i] or b"" for i in ids] + [b""])))
    return out


def check_reads(tok, prefixes, groups):
    reads = member_reads(tok, prefixes, groups, verify=True)
    flat = [(s, j) for s, w in enumerate(reads.seqs) for j in reads.wanted[s]]
    texts = [p for ps in prefixes for p in ps]
    assert sorted(reads.order) == list(range(len(texts)))
    own = 0
    for (s, j), k in zip(flat, reads.order):
        ids = tok(texts[k])["input_ids"]
        assert reads.seqs[s][:j + 1] == ids, texts[k]          # read after exactly tokenizer(prefix)
        pair = next(i for i, ps in enumerate(prefixes) if sum(map(len, prefixes[:i])) + len(ps) > k)
        whole = reads.seqs[pair]
        shared = whole[:len(ids)] == ids
        assert (s == pair) == shared                            # off the pair's sequence iff it can be
        own += s != pair
    assert own == reads.exact
    return reads


@pytest.mark.parametrize("kind", ["trained", "real"])
def test_reads_are_the_prefix_tokenisations(kind):
    toks = trained() if kind == "trained" else real(["llama-spm", "gpt-2", "falcon", "deepseek-coder", "phi-3"])
    if not toks:
        pytest.skip(f"{SHARED} absent")
    rng = random.Random(1)
    shared_total = 0
    for main in list(toks.values())[:2]:
        ps = pairs(main, rng)
        for tok in toks.values():
            reads = check_reads(tok, [p for _, p in ps], [c for c, _ in ps])
            shared_total += sum(len(p) for _, p in ps) - reads.exact
    assert shared_total > 0


def test_update_many_equals_the_tokenizer_on_every_text():
    rng = random.Random(3)
    for tok in trained().values():
        texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(5, 40))) for _ in range(20)]
        tracks = [TokenTrack(tok, t) for t in texts]
        for _ in range(10):
            data = [t.encode() + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3))).encode()[:rng.randint(0, 6)]
                    for t in texts]
            texts = [visible_text(d) for d in data]
            before = [list(tr.ids) for tr in tracks]
            keep = update_many(tracks, texts)
            for tr, t, b, k in zip(tracks, texts, before, keep):
                assert tr.ids == tok(t)["input_ids"]
                assert tr.ids[:k] == b[:k]


def test_batched_encoding_equals_the_tokenizer_call():
    from dln_ens.ensemble.align import encode_with_offsets
    rng = random.Random(4)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30))) for _ in range(30)]
    for tok in {**trained(), **real(["llama-spm", "gpt-2", "falcon", "deepseek-coder", "phi-3"])}.values():
        for special in (True, False):
            got = encode_with_offsets(tok, texts, special)
            for t, (ids, offs) in zip(texts, got):
                enc = tok(t, add_special_tokens=special, return_offsets_mapping=True)
                assert ids == enc["input_ids"] and offs == [tuple(o) for o in enc["offset_mapping"]], t
