"""HFLanguageModel against transformers itself and slow, uncached, one-pair-at-a-time references."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dln_ens.lm.base import LanguageModel
from dln_ens.lm.hf import HFLanguageModel

PROMPTS = [
    "Classify the input.\n\nInput: cat dog.\nAnswer:",
    "Input: red",
    "Classify the input.\n\nInput: left right walk forward three steps north.\nAnswer:",
    "Let's think step by step.",
    "Classify the input.\n\nInput: one.\nAnswer:",
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tiny_gpt2_dir, tiny_llama_dir):
    path = tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir
    return HFLanguageModel.from_pretrained(path, batch_size=3)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax at every position of one unpadded sequence, no cache: the reference."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1)


def hf_greedy(lm, prompt: str, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([lm.encode(prompt)])
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=lm.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def continuation(tok, prompt_ids, new_ids) -> str:
    """Reference text of a continuation: decode everything, drop the prompt's own text."""
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    whole = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
    assert whole.startswith(head)
    return whole[len(head):]


def test_is_a_language_model(lm):
    assert isinstance(lm, LanguageModel)
    assert lm.vocab_size == lm.model.get_output_embeddings().weight.shape[0]
    assert lm.eos_token_id == lm.tokenizer.eos_token_id


def test_greedy_matches_transformers_generate(lm):
    new_ids, logps = lm.generate_ids([lm.encode(p) for p in PROMPTS], max_new_tokens=12)  # one mixed batch
    gens = lm.generate(PROMPTS, max_new_tokens=12)
    for p, ids, lp, g in zip(PROMPTS, new_ids, logps, gens):
        expected = hf_greedy(lm, p, 12)
        assert ids == expected
        prompt_ids = lm.encode(p)
        ref = full_logprobs(lm.model, prompt_ids + ids)
        ref_lp = [ref[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(ids)]
        np.testing.assert_allclose(lp, ref_lp, atol=1e-4)
        assert g.num_tokens == len(expected)
        assert g.logprob == pytest.approx(sum(ref_lp), abs=1e-3)
        assert g.text == continuation(lm.tokenizer, prompt_ids, expected)


def test_eos_ends_generation(tiny_llama_dir):
    lm = HFLanguageModel.from_pretrained(tiny_llama_dir)
    free = hf_greedy(lm, PROMPTS[0], 10)
    eos = free[3]  # a token greedy decoding reaches: make it an extra EOS, as multi-EOS models have
    lm.model.generation_config.eos_token_id = [lm.eos_token_id, eos]
    lm = HFLanguageModel(lm.model, lm.tokenizer)
    expected = hf_greedy(lm, PROMPTS[0], 10)
    assert expected == free[:free.index(eos) + 1]
    [ids], _ = lm.generate_ids([lm.encode(PROMPTS[0])], max_new_tokens=10)
    assert ids == expected
    [g] = lm.generate(PROMPTS[:1], max_new_tokens=10)
    assert g.num_tokens == len(expected)


def test_results_do_not_depend_on_batch(lm):
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=7)):
        batched = lm.generate(PROMPTS, max_new_tokens=10, **kw)
        for p, b in zip(PROMPTS, batched):
            [alone] = lm.generate([p], max_new_tokens=10, **kw)
            assert alone.text == b.text and alone.num_tokens == b.num_tokens
            assert alone.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_sampling_repeats_with_seed_and_varies(lm):
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]]
    a = lm.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3)
    b = lm.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3)
    c = lm.generate(prompts, max_new_tokens=8, temperature=1.0, seed=4)
    assert [g.text for g in a] == [g.text for g in b]
    assert len({g.text for g in a[:4]}) > 1  # repeated prompts are distinct samples
    assert [g.text for g in a] != [g.text for g in c]
    # the reported log-prob is the untempered model's, over the sampled tokens
    prompt_ids = lm.encode(prompts[4])
    ids = lm.generate_ids([prompt_ids], max_new_tokens=8, temperature=1.0, seed=3, texts=prompts[4:])[0][0]
    ref = full_logprobs(lm.model, prompt_ids + ids)
    assert a[4].logprob == pytest.approx(sum(ref[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(ids)),
                                         abs=1e-3)


def test_stop_strings_cut_text_and_count_tokens(lm):
    checked = 0
    for p in PROMPTS:
        prompt_ids = lm.encode(p)
        free = hf_greedy(lm, p, 16)
        text = continuation(lm.tokenizer, prompt_ids, free)
        # a plain ASCII stop inside the text (not at its very start), and a later one
        spots = [i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isalnum()]
        if not spots:
            continue
        stop, later = text[spots[0]], "\x00never"
        cut = text.index(stop)
        n = next(k for k in range(1, len(free) + 1) if stop in continuation(lm.tokenizer, prompt_ids, free[:k]))
        ref = full_logprobs(lm.model, prompt_ids + free)
        [g] = lm.generate([p], max_new_tokens=16, stop=[later, stop])
        assert g.text == text[:cut] and g.num_tokens == n
        assert g.logprob == pytest.approx(sum(ref[len(prompt_ids) - 1 + k, free[k]].item() for k in range(n)),
                                          abs=1e-3)
        checked += 1
    assert checked >= 2


def reference_score(lm, ctx_ids, tgt_ids) -> float:
    lp = full_logprobs(lm.model, ctx_ids + tgt_ids)
    return sum(lp[len(ctx_ids) - 1 + k, t].item() for k, t in enumerate(tgt_ids))


def test_score_matches_uncached_reference(lm):
    contexts, targets = [], []
    for ctx in PROMPTS[:3] + [""]:
        for tgt in [" Yes", " No", " (A) because the cat is red", "\nLet's think"]:
            contexts.append(ctx)
            targets.append(tgt)
    contexts.append(PROMPTS[3])
    targets.append(" three steps north and two steps east of the blue dog")
    scores = lm.score(contexts, targets)
    for ctx, tgt, s in zip(contexts, targets, scores):
        ctx_ids, whole = lm.encode(ctx), lm.encode(ctx + tgt)
        assert whole[:len(ctx_ids)] == ctx_ids  # these pairs split cleanly
        ctx_ids = ctx_ids or [lm.tokenizer.bos_token_id]  # empty context: predict from BOS
        tgt_ids = whole[len(lm.encode(ctx)):]
        assert s.num_tokens == len(tgt_ids)
        assert s.logprob == pytest.approx(reference_score(lm, ctx_ids, tgt_ids), abs=1e-4)


def test_score_boundary_rules(lm):
    tok = lm.tokenizer
    # trailing whitespace of the context moves into the target, as lm-evaluation-harness does
    [(ctx, tgt)] = lm.split_pairs(["Input: cat.\nAnswer: "], ["Yes"])
    assert (ctx, tgt) == (lm.encode("Input: cat.\nAnswer:"), lm.encode("Input: cat.\nAnswer: Yes")[len(ctx):])
    # a context whose last token merges with the target: the target is encoded on its own
    context, target = "Input: cat.\nAnsw", "er: Yes"
    assert lm.encode(context + target)[:len(lm.encode(context))] != lm.encode(context)
    [(ctx, tgt)] = lm.split_pairs([context], [target])
    assert (ctx, tgt) == (lm.encode(context), tok(target, add_special_tokens=False)["input_ids"])
    [s] = lm.score([context], [target])
    assert s.logprob == pytest.approx(reference_score(lm, ctx, tgt), abs=1e-4)
    assert lm.score(["Answer:"], [""])[0].num_tokens == 0


def test_score_runs_a_shared_context_once(lm):
    calls = []
    forward = lm.forward

    def counting_forward(input_ids, attention_mask, *args, **kw):
        calls.append(input_ids.shape)
        return forward(input_ids, attention_mask, *args, **kw)

    lm.forward = counting_forward
    try:
        targets = [" Yes", " No", " (A)", " (B)", " maybe", " true"]
        lm.batch_size = len(targets)
        lm.score([PROMPTS[2]] * len(targets), targets)
    finally:
        del lm.forward
        lm.batch_size = 3
    fed = sum(b * t for b, t in calls)
    longest = max(len(lm.split_pairs([PROMPTS[2]], [t])[0][1]) for t in targets)
    assert fed <= len(lm.encode(PROMPTS[2])) + len(targets) * longest


def test_next_token_distribution(lm):
    dist = lm.next_token_distribution(PROMPTS)
    assert dist.shape == (len(PROMPTS), lm.vocab_size) and dist.dtype == torch.float32
    for p, row in zip(PROMPTS, dist):
        torch.testing.assert_close(row, full_logprobs(lm.model, lm.encode(p))[-1], atol=1e-4, rtol=0)


def test_next_token_logprobs_matches_direct_computation(lm):
    candidates = ["Yes", "No", "(A)", " maybe"]
    got = lm.next_token_logprobs(PROMPTS, candidates)
    assert got.shape == (len(PROMPTS), len(candidates))
    for i, p in enumerate(PROMPTS):
        ctx = lm.encode(p)
        last = full_logprobs(lm.model, ctx)[-1]
        for j, cand in enumerate(candidates):
            word = cand.strip()
            firsts = {lm.encode(p + v)[len(ctx)] for v in (" " + word, word)}
            assert got[i, j] == pytest.approx(max(last[t].item() for t in firsts), abs=1e-4)


def hand_first_token(lm, context: str, form: str) -> int:
    """The token a form starts with after a context: the first beyond the context's tokens, or
    the form's own first token when the context's tokens are not a prefix."""
    ctx, whole = lm.encode(context), lm.encode(context + form)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return whole[len(ctx)]
    return lm.tokenizer(form, add_special_tokens=False)["input_ids"][0]


def test_next_token_logprobs_sum_counts_each_distinct_token_once(lm):
    """"sum": log of the total probability of the distinct first tokens of every form (alternatives
    "a|A", with and without a leading space); a context ending in a space gives " Yes" and "Yes"
    the same token under SentencePiece (counted once); "Yes." starts like "Yes"."""
    contexts = PROMPTS[:2] + ["Answer: "]
    candidates = ["Yes|Yes.", "No|no", "(A)"]
    shared = False
    for aggregate in ("sum", "max"):
        got = lm.next_token_logprobs(contexts, candidates, aggregate=aggregate)
        for i, p in enumerate(contexts):
            probs = torch.exp(full_logprobs(lm.model, lm.encode(p))[-1]).double()
            for j, cand in enumerate(candidates):
                forms = [v for a in cand.split("|") for v in (" " + a, a)]
                firsts = [hand_first_token(lm, p, v) for v in forms]
                shared |= len(set(firsts)) < len(firsts)
                want = sum(probs[t] for t in set(firsts)) if aggregate == "sum" else max(probs[t] for t in firsts)
                assert got[i, j] == pytest.approx(math.log(float(want)), abs=1e-4)
    assert shared, "some forms share a first token, so counting them twice would fail the test"


def test_forward_is_the_only_model_hook(tiny_gpt2_dir):
    """A subclass that changes forward (as Mixture-of-Depths does) changes every protocol method."""
    base = HFLanguageModel.from_pretrained(tiny_gpt2_dir)
    favourite = base.encode(" Yes")[0]

    class Biased(HFLanguageModel):
        def forward(self, input_ids, attention_mask, past_key_values=None, position_ids=None):
            logits, cache = super().forward(input_ids, attention_mask, past_key_values, position_ids)
            logits[..., favourite] += 50.0
            return logits, cache

    lm = Biased(base.model, base.tokenizer)
    [ids], _ = lm.generate_ids([lm.encode(PROMPTS[0])], max_new_tokens=4)
    assert ids == [favourite] * 4
    assert lm.score([PROMPTS[0]], [" Yes Yes"])[0].logprob > -1e-3
    assert lm.next_token_distribution(PROMPTS[:2]).argmax(-1).tolist() == [favourite] * 2


def test_no_pad_token_is_added(tiny_gpt2_dir):
    lm = HFLanguageModel.from_pretrained(tiny_gpt2_dir)
    rows = lm.model.get_input_embeddings().weight.shape[0]
    lm.generate(PROMPTS[:2], max_new_tokens=2)
    assert lm.tokenizer.pad_token is None and lm.pad_token_id == lm.eos_token_id
    assert lm.model.get_input_embeddings().weight.shape[0] == rows


def test_load_options(tiny_llama_dir):
    lm = HFLanguageModel.from_pretrained(tiny_llama_dir, dtype="bfloat16", device_map="cpu", name="m", batch_size=2)
    assert lm.model.dtype == torch.bfloat16 and lm.name == "m" and lm.device.type == "cpu"
    assert lm.next_token_distribution(["Input:"]).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        HFLanguageModel.from_pretrained(tiny_llama_dir, dtype="float8")


def test_missing_pieces_are_named(tmp_path, tiny_gpt2_dir):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        HFLanguageModel.from_pretrained(missing)
    assert str(missing) in str(err.value)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="no weights") as err:
        HFLanguageModel.from_pretrained(no_weights)
    assert str(no_weights) in str(err.value)

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gpt2_dir, no_tokenizer)
    for f in no_tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer") as err:
        HFLanguageModel.from_pretrained(no_tokenizer)
    assert str(no_tokenizer) in str(err.value)

    with pytest.raises(FileNotFoundError, match="config.json"):
        HFLanguageModel.from_pretrained(tmp_path)


SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.mark.parametrize("name", ["gpt-2", "llama-spm"])
def test_real_tokenizers(name):
    """Real vocabularies (byte-level BPE; SentencePiece with BOS, "▁" spaces and byte fallback)
    on a random tiny model: greedy text, scoring and candidates against the references."""
    path = SHARED / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"{path} not available")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.5)
    torch.manual_seed(0)
    lm = HFLanguageModel(LlamaForCausalLM(config), tok, batch_size=4)
    prompts = ["Input: Führer ✓ café\nAnswer:", "Q: 1+1=?\nA:", "naïve"]
    gens = lm.generate(prompts, max_new_tokens=6)
    for p, g in zip(prompts, gens):
        expected = hf_greedy(lm, p, 6)
        assert g.text == continuation(tok, lm.encode(p), expected) and g.num_tokens == len(expected)
    contexts, targets = ["Input: café\nAnswer:", "Input: café\nAnswer: ", "Input: café\nAnswer:"], [" Yes", "No", "\n"]
    for (ctx, tgt), s in zip(lm.split_pairs(contexts, targets), lm.score(contexts, targets)):
        assert s.logprob == pytest.approx(reference_score(lm, ctx, tgt), abs=1e-4)
    got = lm.next_token_logprobs(contexts[:1], ["Yes", "No"])
    ctx = lm.encode(contexts[0])
    last = full_logprobs(lm.model, ctx)[-1]
    for j, word in enumerate(["Yes", "No"]):
        firsts = {lm.encode(contexts[0] + v)[len(ctx)] for v in (" " + word, word)}
        assert got[0, j] == pytest.approx(max(last[t].item() for t in firsts), abs=1e-4)
