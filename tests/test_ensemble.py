"""EnsembleLanguageModel against slow, obviously-correct loops written here: every step
re-tokenises the whole text for every non-main member and runs every member from scratch."""
import math
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deepen_reference import reference_fuse
from dln_ens.ensemble.model import EnsembleLanguageModel
from dln_ens.lm.hf import HFLanguageModel
from dln_ens.relrep.build import build_matrices
from dln_ens.relrep.store import load_matrices
from dln_ens.relrep.vocab import token_surfaces
from dln_ens.zoo.tokenizers import train_byte_bpe, train_sp_bpe

WORDS = "the a fox dog cat runs jumps over under lazy quick brown red Answer: yes no Input: 1 2 3 , . ! ?".split()


def corpus(seed, n=300):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n" for _ in range(n)]


def peaked(model, scale):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(0)
    tok_b = train_byte_bpe(corpus(1), 320)
    tok_s = train_sp_bpe(corpus(2), 420)
    tok_w = train_byte_bpe(corpus(3), 280)
    ids = dict(bos_token_id=tok_b.eos_token_id, eos_token_id=tok_b.eos_token_id)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok_b), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                     tie_word_embeddings=False, **ids))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok_s) + 4, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256, tie_word_embeddings=False,
                                         bos_token_id=tok_s.bos_token_id, eos_token_id=tok_s.eos_token_id))
    wp = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok_w), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=256,
                                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok_w.eos_token_id))
    return {"sp": HFLanguageModel(peaked(llama, 6.0), tok_s, name="sp"),
            "bpe": HFLanguageModel(peaked(gpt, 6.0), tok_b, name="bpe"),
            "wp": HFLanguageModel(peaked(wp, 6.0), tok_w, name="wp")}


@pytest.fixture(scope="module")
def matdir(members, tmp_path_factory):
    d = tmp_path_factory.mktemp("mat")
    build_matrices(members, d, topk=16, min_anchors=10, progress=False, value_dtype="float32")
    return d


def visible(data: bytes) -> str:
    """Decode, holding back a trailing incomplete character (Unicode Table 3-7 byte ranges)."""
    second = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
    for k in (1, 2, 3):
        tail = data[-k:]
        if len(tail) < k:
            break
        lead = tail[0]
        need = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        lo, hi = second.get(lead, (0x80, 0xBF))
        ok = need > k and all(0x80 <= c <= 0xBF for c in tail[1:]) and (k < 2 or lo <= tail[1] <= hi)
        if ok:
            return data[:-k].decode("utf-8", errors="replace")
    return data.decode("utf-8", errors="replace")


def slow_logits(members, main, text: bytes, main_ids):
    """Every member's next-token logits, from scratch, on its own tokenisation of the text."""
    logits = {}
    with torch.no_grad():
        for n, m in members.items():
            ids = main_ids if n == main else m.encode(visible(text))
            logits[n] = m.model(torch.tensor([ids])).logits[0, -1].float()
    return logits


def slow_next(members, main, dense, weights, text: bytes, main_ids, lr=0.15):
    return reference_fuse(slow_logits(members, main, text, main_ids), dense, main, weights, lr)


def slow_generate(members, main, dense, prompt, max_new, stop=(), fuse=None):
    weights = {n: 1 / len(members) for n in members}
    m = members[main]
    surf = token_surfaces(m.tokenizer)
    text, ids, logp = prompt.encode(), m.nonempty(m.encode(prompt)), 0.0
    for _ in range(max_new):
        if fuse is None:
            lp = slow_next(members, main, dense, weights, text, ids)
        else:
            lp = fuse(slow_logits(members, main, text, ids))
        tok = int(lp.argmax())
        logp += float(lp[tok])
        if tok in m.stop_token_ids:
            break
        ids = ids + [tok]
        text += surf[tok] or b""
        if any(s in text[len(prompt.encode()):].decode("utf-8", "replace") for s in stop):
            break
    out = text[len(prompt.encode()):].decode("utf-8", "replace")
    for s in stop:
        out = out.split(s)[0] if s in out else out
    return out, logp


PROMPTS = ["the quick brown fox", "Input: 1 2 , the lazy dog runs over the red cat\nAnswer:", "a",
           "no ! the cat jumps under a quick dog . yes"]


def test_greedy_equals_slow_reference(members, matdir):
    mats, _ = load_matrices(matdir, members)
    dense = {n: r.to_dense() for n, r in mats.items()}
    ens = EnsembleLanguageModel(members, main="sp", matrices=matdir, tail_mass=0.0, verify_alignment=True)
    gens = ens.generate(PROMPTS, max_new_tokens=12)
    for p, g in zip(PROMPTS, gens):
        text, logp = slow_generate(members, "sp", dense, p, 12)
        assert g.text == text
        assert g.logprob == pytest.approx(logp, abs=1e-3)
    # another main member (preloaded matrices)
    ens = EnsembleLanguageModel(members, main="bpe", matrices=mats, tail_mass=0.0)
    for p, g in zip(PROMPTS[:2], ens.generate(PROMPTS[:2], max_new_tokens=10)):
        assert g.text == slow_generate(members, "bpe", dense, p, 10)[0]


def test_single_member_and_lr_zero_are_the_main_member(members, matdir):
    sp = members["sp"]
    surf = token_surfaces(sp.tokenizer)
    ids, lps = sp.generate_ids([sp.nonempty(sp.encode(p)) for p in PROMPTS], max_new_tokens=10)
    # the ensemble's text is the bytes of the tokens (transformers' decode may print byte-fallback
    # runs differently), so compare with the main member's own greedy ids turned into bytes
    own = [b"".join(surf[i] or b"" for i in x if i not in sp.stop_token_ids).decode("utf-8", "replace") for x in ids]
    alone = EnsembleLanguageModel({"sp": sp}, main="sp").generate(PROMPTS, max_new_tokens=10)
    lr0 = EnsembleLanguageModel(members, main="sp", matrices=matdir, lr=0.0).generate(PROMPTS, max_new_tokens=10)
    for text, x, lp, b, c in zip(own, ids, lps, alone, lr0):
        assert text == b.text == c.text
        assert len(x) == b.num_tokens == c.num_tokens
        assert b.logprob == pytest.approx(sum(lp), abs=1e-3)


def test_prompt_in_a_mixed_batch_equals_alone(members, matdir):
    ens = EnsembleLanguageModel(members, main="sp", matrices=matdir, batch_size=4)
    batch = ens.generate(PROMPTS, max_new_tokens=10, stop=["\n"])
    for p, g in zip(PROMPTS, batch):
        alone = ens.generate([p], max_new_tokens=10, stop=["\n"])[0]
        assert alone.text == g.text and alone.num_tokens == g.num_tokens
        assert alone.logprob == pytest.approx(g.logprob, abs=1e-4)
        assert "\n" not in g.text


def test_sampling_is_seeded(members, matdir):
    ens = EnsembleLanguageModel(members, main="bpe", matrices=matdir)
    a = ens.generate(PROMPTS, max_new_tokens=8, temperature=1.5, seed=3)
    b = ens.generate(PROMPTS[::-1], max_new_tokens=8, temperature=1.5, seed=3)[::-1]
    assert [g.text for g in a] == [g.text for g in b]


def test_score_exact_equals_slow_reference_and_fast_is_close(members, matdir):
    mats, _ = load_matrices(matdir, members)
    dense = {n: r.to_dense() for n, r in mats.items()}
    weights = {n: 1 / 3 for n in members}
    contexts = ["the quick brown fox", "Input: 1 2 , the lazy dog\nAnswer:"]
    targets = [" jumps over the dog", " yes"]
    ens = EnsembleLanguageModel(members, main="sp", matrices=matdir, tail_mass=0.0)
    exact = ens.score(contexts, targets)
    main = members["sp"]
    surf = token_surfaces(main.tokenizer)
    for (ctx_ids, tgt), c, s in zip(main.split_pairs(contexts, targets), contexts, exact):
        text, ids, want = c.encode(), list(ctx_ids), 0.0
        for tok in tgt:
            want += float(slow_next(members, "sp", dense, weights, text, ids)[tok])
            ids, text = ids + [tok], text + (surf[tok] or b"")
        assert s.num_tokens == len(tgt)
        assert s.logprob == pytest.approx(want, abs=1e-3)
    fast = EnsembleLanguageModel(members, main="sp", matrices=matdir, tail_mass=0.0, score_mode="fast")
    for e, f in zip(exact, fast.score(contexts, targets)):
        assert f.num_tokens == e.num_tokens
        assert f.logprob == pytest.approx(e.logprob, abs=2e-4)   # one pass equals exact mode up to float rounding


def test_next_token_distribution_and_logprobs(members, matdir):
    mats, _ = load_matrices(matdir, members)
    dense = {n: r.to_dense() for n, r in mats.items()}
    ens = EnsembleLanguageModel(members, main="sp", matrices=matdir, tail_mass=0.0)
    dist = ens.next_token_distribution(PROMPTS[:2])
    main = members["sp"]
    for p, row in zip(PROMPTS[:2], dist):
        want = slow_next(members, "sp", dense, {n: 1 / 3 for n in members}, p.encode(), main.encode(p))
        assert torch.allclose(row, want, atol=1e-4)
    lp = ens.next_token_logprobs(PROMPTS[:2], ["yes", "no"])
    for i, p in enumerate(PROMPTS[:2]):       # the first token of " cand" / "cand" after p, max of the two
        ctx = main.encode(p)
        for j, cand in enumerate(["yes", "no"]):
            firsts = []
            for v in (" " + cand, cand):
                whole = main.encode(p + v)
                assert whole[:len(ctx)] == ctx
                firsts.append(whole[len(ctx)])
            assert lp[i, j] == pytest.approx(max(float(dist[i, t]) for t in firsts), abs=1e-6)
    contexts = PROMPTS[:2] + ["Answer: "]
    dist = ens.next_token_distribution(contexts)
    for aggregate in ("sum", "max"):   # forms of "yes|Yes" and "no": distinct first tokens, once each
        lp = ens.next_token_logprobs(contexts, ["yes|Yes", "no"], aggregate=aggregate)
        for i, p in enumerate(contexts):
            ctx = main.encode(p)
            for j, cand in enumerate(["yes|Yes", "no"]):
                firsts = set()
                for v in [w for a in cand.split("|") for w in (" " + a, a)]:
                    whole = main.encode(p + v)
                    ok = whole[:len(ctx)] == ctx and len(whole) > len(ctx)
                    firsts.add(whole[len(ctx)] if ok else main.tokenizer(v, add_special_tokens=False)["input_ids"][0])
                probs = [math.exp(float(dist[i, t])) for t in firsts]
                want = math.log(sum(probs) if aggregate == "sum" else max(probs))
                assert lp[i, j] == pytest.approx(want, abs=1e-5)


def test_union_and_main_methods_generate(members, matdir):
    main_only = EnsembleLanguageModel(members, main="bpe", method="main").generate(PROMPTS[:2], max_new_tokens=6)
    lr0 = EnsembleLanguageModel(members, main="bpe", matrices=matdir, lr=0.0).generate(PROMPTS[:2], max_new_tokens=6)
    assert [g.text for g in main_only] == [g.text for g in lr0]
    union = EnsembleLanguageModel(members, main="bpe", method="union", topk=5)
    gens = union.generate(PROMPTS, max_new_tokens=6)
    for p, g in zip(PROMPTS, gens):
        want, logp = slow_generate(members, "bpe", None, p, 6, fuse=lambda lg: slow_union(members, "bpe", lg, 5))
        assert g.text == want and g.logprob == pytest.approx(logp, abs=1e-4)


def slow_union(members, main, logits, k):
    """Union of top-k by surface bytes, one token at a time with dicts (`fusion.union`'s rule:
    a surface's id is the tokenizer's own, i.e. a vocabulary token before a byte-fallback one)."""
    def ids_by_surface(m):
        surf, toks = token_surfaces(m.tokenizer), m.tokenizer.convert_ids_to_tokens(list(range(m.vocab_size)))
        out = {}
        for i in range(min(len(surf), m.vocab_size)):
            if surf[i] and (surf[i] not in out or (toks[out[surf[i]]].startswith("<0x") and not toks[i].startswith("<0x"))):
                out[surf[i]] = i
        return out
    w = 1 / len(members)
    probs = {n: torch.softmax(logits[n], -1) for n in members}
    by_surface = {n: ids_by_surface(m) for n, m in members.items()}
    main_ids = by_surface[main]
    union = set()
    for n, m in members.items():
        surf = token_surfaces(m.tokenizer)
        union |= {surf[i] for i in probs[n].topk(k).indices.tolist() if i < len(surf) and surf[i] in main_ids}
    fused = w * probs[main].clone()
    for s in union:
        fused[main_ids[s]] = sum(w * float(probs[n][by_surface[n][s]]) for n in members if s in by_surface[n])
    return torch.log(fused / fused.sum())


def test_members_that_cannot_change_the_result_are_not_run(members, matdir, monkeypatch):
    """Method ``main`` and ``lr=0`` read only the main member: no other member runs a forward."""
    calls = {n: 0 for n in members}
    for n, m in members.items():
        orig = m.last_logits

        def counted(*a, _n=n, _orig=orig, **k):
            calls[_n] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(m, "last_logits", counted)
    for ens in (EnsembleLanguageModel(members, main="bpe", method="main"),
                EnsembleLanguageModel(members, main="bpe", matrices=matdir, lr=0.0)):
        ens.generate(PROMPTS[:2], max_new_tokens=4)
        ens.score(PROMPTS[:2], [" a b", " c"])
    assert calls["bpe"] > 0 and all(calls[n] == 0 for n in members if n != "bpe"), calls
    EnsembleLanguageModel(members, main="bpe", matrices=matdir).generate(PROMPTS[:1], max_new_tokens=2)
    assert all(calls[n] > 0 for n in members), calls


def test_settings_are_refused_in_the_python_api_as_in_the_config(members, matdir):
    from dln_ens.fusion.base import SettingsError
    for bad, words in (({"lr": float("nan")}, "finite"), ({"steps": -1}, "at least 0"), ({"tail_mass": 1.0}, "less than 1"),
                       ({"lr_": 0.1}, "did you mean 'lr'"), ({"weights": {"bpe": 0.0, "sp": 0.0}}, "sum to 0")):
        with pytest.raises(SettingsError, match=words):
            EnsembleLanguageModel({"bpe": members["bpe"], "sp": members["sp"]}, main="bpe", matrices=matdir, **bad)
    with pytest.raises(SettingsError, match="unknown fusion method 'mean'"):
        EnsembleLanguageModel(members, main="bpe", method="mean")


def test_one_pass_score_equals_exact_mode(members, matdir, monkeypatch):
    """The default one-pass score against the forced decode (exact mode), for every main member,
    on targets that split words and characters differently in each member; and the
    support-restricted fusion too (forced on these small matrices, which the defaults compute
    exactly). They differ only by float rounding."""
    from dln_ens.fusion import deepen
    monkeypatch.setattr(deepen, "EXACT_ENTRIES", 0)
    contexts = ["the quick brown fox", "Input: 1 2 , the lazy dog\nAnswer:", "a", "Ünï 🙂 yes"]
    targets = [" jumps over the dog", " yes", " foxes runs 🙂 é", "x  y\n z", ""]
    C = [c for c in contexts for _ in targets]
    T = targets * len(contexts)
    for main in ("sp", "bpe", "wp"):
        for kw in ({"tail_mass": 0.0}, {}):
            exact_lm = EnsembleLanguageModel(members, main=main, matrices=matdir, score_mode="exact", **kw)
            assert any(exact_lm.fusion.restricted.values()) == ("tail_mass" not in kw)
            exact = exact_lm.score(C, T)
            fast = EnsembleLanguageModel(members, main=main, matrices=matdir, batch_size=3, verify_alignment=True,
                                         **kw).score(C, T)
            for c, t, e, f in zip(C, T, exact, fast):
                assert f.num_tokens == e.num_tokens
                assert f.logprob == pytest.approx(e.logprob, abs=2e-4), (main, c, t)


def test_auto_score_mode_is_one_pass_where_the_method_allows_it(members, matdir):
    pair = {"bpe": members["bpe"], "sp": members["sp"]}
    assert EnsembleLanguageModel(pair, main="bpe", method="union").score_mode == "fast"
    assert EnsembleLanguageModel(pair, main="bpe", method="surface").score_mode == "exact"
    assert EnsembleLanguageModel(pair, main="bpe", method="union", weighting="perplexity").score_mode == "exact"
    from dln_ens.fusion.base import SettingsError
    with pytest.raises(SettingsError, match="score_mode 'fast'.*'surface'"):
        EnsembleLanguageModel(pair, main="bpe", method="surface", score_mode="fast")
