"""Mixture-of-Depths members: exactness against the base model, the mixing math against a
reference written here from transformers' own hidden states, routing, tuning, head files."""
from __future__ import annotations

import json
import random
import sys

import pytest
import torch
import transformers as T

from dln_ens.backends import BackendPool
from dln_ens.config import parse_config
from dln_ens.data import Example, Task
from dln_ens.data.registry import registered_tasks
from dln_ens.lm.hf import HFLanguageModel
from dln_ens.mod import heads
from dln_ens.mod.arch import UnsupportedModelError
from dln_ens.mod.model import DepthEnsembleLanguageModel, default_head_dir
from dln_ens.mod.tune import encode_examples, held_out_loss, tune_mod, tune_mod_from_config

INSTRUCTION = "Say whether the number is even."


def _examples(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        x = rng.randint(0, 99)
        out.append(Example(f"{x}", "Yes" if x % 2 == 0 else "No"))
    return out


def _task(seed: int = 0) -> Task:
    rng = random.Random(seed)
    return Task("mod_even", INSTRUCTION, _examples(rng, 64), _examples(rng, 24), _examples(rng, 32),
                classes=["Yes", "No"])


@pytest.fixture(autouse=True, scope="module")
def _tasks():
    with registered_tasks({"mod_even_test": lambda **kw: _task()}):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    from dln_ens.zoo.tokenizers import train_byte_bpe
    corpus = [f"{INSTRUCTION}\n\nInput: {e.input}\nAnswer: {e.target}\n" for e in _task(1).train]
    return train_byte_bpe(corpus * 3, 300)


def _config(kind: str, vocab: int):
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common))
    if kind == "neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                    num_attention_heads=4, max_position_embeddings=128, **common))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=2, **common))
    raise AssertionError(kind)


def _final_norm(model):
    return {"llama": lambda m: m.model.norm, "qwen2": lambda m: m.model.norm,
            "gpt2": lambda m: m.transformer.ln_f, "gpt_neox": lambda m: m.gpt_neox.final_layer_norm
            }[model.config.model_type](model)


def _build(kind: str, tokenizer, path, seed: int = 0) -> HFLanguageModel:
    """A random tiny model with a non-trivial final norm, saved and loaded back."""
    torch.manual_seed(seed)
    model = _config(kind, len(tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        norm = _final_norm(model)
        norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return HFLanguageModel.from_pretrained(str(path), name=kind)


@pytest.fixture(scope="module", params=["llama", "gpt2", "neox"])
def base(request, tokenizer, tmp_path_factory):
    return _build(request.param, tokenizer, tmp_path_factory.mktemp(request.param) / request.param)


def _batch(lm, texts):
    ids = [lm.encode(t) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(s)) + s for s in ids])       # left padding
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
    return input_ids, mask


TEXTS = ["Say whether the number is even.\n\nInput: 12\nAnswer:", "Input: 7\nAnswer: No"]


# ----------------------------------------------------------------------------- reference math

def _ref_norm(model, h, weight, bias):
    """The architecture's final-norm formula, written out."""
    h = h.double()
    if model.config.model_type in ("llama", "qwen2"):
        eps = model.config.rms_norm_eps
        return weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    eps = model.config.layer_norm_epsilon if model.config.model_type == "gpt2" else model.config.layer_norm_eps
    mu = h.mean(-1, keepdim=True)
    var = (h - mu).pow(2).mean(-1, keepdim=True)
    return weight.double() * (h - mu) / torch.sqrt(var + eps) + bias.double()


def _ref_layer_states(model, input_ids, mask):
    """Pre-final-norm outputs of the last two layers from transformers itself: the second to
    last from output_hidden_states, the last from the input of the final norm (transformers
    replaces hidden_states[-1] with the normed state)."""
    seen = []
    handle = _final_norm(model).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    finally:
        handle.remove()
    L = model.config.num_hidden_layers
    assert len(out.hidden_states) == L + 1
    return out, out.hidden_states[L - 1], seen[0]


# ----------------------------------------------------------------------------- tests

def test_k1_equals_base(base):
    mod = DepthEnsembleLanguageModel(base, k_last=1)
    input_ids, mask = _batch(base, TEXTS)
    with torch.no_grad():
        want = base.model(input_ids=input_ids, attention_mask=mask).logits.float()
        got, _ = mod.forward(input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.next_token_distribution(TEXTS), base.next_token_distribution(TEXTS),
                               rtol=1e-5, atol=1e-5)


def test_k1_equals_base_qwen2(tokenizer, tmp_path):
    base = _build("qwen2", tokenizer, tmp_path / "qwen2")
    mod = DepthEnsembleLanguageModel(base, k_last=1, router="learned")
    torch.testing.assert_close(mod.next_token_distribution(TEXTS), base.next_token_distribution(TEXTS),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router,top_k", [("uniform", None), ("learned", None), ("learned", 1)])
def test_k2_mixes_layer_logits(base, router, top_k):
    """Output = sum_j w_j * lm_head(norm_j(h_j)), every piece recomputed here independently."""
    torch.manual_seed(1)
    mod = DepthEnsembleLanguageModel(base, k_last=2, router=router, top_k=top_k)
    with torch.no_grad():  # trained-looking head: distinct norms per layer, a non-zero router
        mod.head.norm_weight.add_(0.3 * torch.randn_like(mod.head.norm_weight))
        if mod.head.norm_bias is not None:
            mod.head.norm_bias.add_(0.3 * torch.randn_like(mod.head.norm_bias))
        if mod.head.router is not None:
            mod.head.router.weight.normal_(0, 1.0)
            mod.head.router.bias.normal_(0, 1.0)
    model = base.model
    input_ids, mask = _batch(base, TEXTS)
    out, h_prev, h_last = _ref_layer_states(model, input_ids, mask)
    W = model.get_output_embeddings().weight.double()
    bias = mod.head.norm_bias if mod.head.norm_bias is not None else [None, None]
    z = [_ref_norm(model, h, mod.head.norm_weight[j].detach(), None if bias[j] is None else bias[j].detach()) @ W.T
         for j, h in enumerate([h_prev, h_last])]
    if router == "uniform":
        w = torch.full((*input_ids.shape, 2), 0.5, dtype=torch.float64)
    else:
        final = out.hidden_states[-1].double()   # the base's normed final state feeds the router
        r = final @ mod.head.router.weight.detach().double().T + mod.head.router.bias.detach().double()
        w = r.softmax(-1)
        if top_k == 1:
            w = torch.nn.functional.one_hot(w.argmax(-1), 2).double()
    want = w[..., :1] * z[0] + w[..., 1:] * z[1]
    with torch.no_grad():
        got, _ = mod.forward(input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real].double(), want[real], rtol=1e-4, atol=1e-4)
    if router == "uniform":  # also: exactly the average of the two layers' logits
        torch.testing.assert_close(got[real].double(), ((z[0] + z[1]) / 2)[real], rtol=1e-4, atol=1e-4)


def test_kv_cache_matches_full_forward(base):
    mod = DepthEnsembleLanguageModel(base, k_last=3, router="learned")
    with torch.no_grad():
        mod.head.router.weight.normal_(0, 1.0)
    input_ids, mask = _batch(base, TEXTS)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)   # left padding: positions count real tokens
        full, _ = mod.forward(input_ids, mask, position_ids=pos)
        _, cache = mod.forward(input_ids[:, :-1], mask[:, :-1], position_ids=pos[:, :-1])
        step, _ = mod.forward(input_ids[:, -1:], mask, past_key_values=cache, position_ids=pos[:, -1:])
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_top_k_routing():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 4)
    for k in (1, 2, 3, 4):
        w = heads.route(logits, top_k=k)
        assert ((w > 0).sum(-1) == k).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(5, 7))
        p = logits.softmax(-1)
        kept = p >= p.sort(-1, descending=True).values[..., k - 1:k]     # the K largest
        assert torch.equal(w > 0, kept)
        torch.testing.assert_close(w[kept], (p / (p * kept).sum(-1, keepdim=True))[kept])
    # top-1: the kept weight is exactly 1, so the router must get exactly no gradient (rounding
    # noise there is what Adam turns into random re-routing)
    x = logits.clone().requires_grad_()
    (heads.route(x, top_k=1) * torch.randn(5, 7, 4)).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_greedy_generate_k1_equals_base(base):
    mod = DepthEnsembleLanguageModel(base, k_last=1, router="uniform")
    prompts = ["Input: 4\nAnswer:", "Say whether the number is even.\n\nInput: 31\nAnswer:"]
    want = base.generate(prompts, max_new_tokens=8)
    got = mod.generate(prompts, max_new_tokens=8)
    assert [g.text for g in got] == [g.text for g in want]
    for a, b in zip(got, want):
        assert a.num_tokens == b.num_tokens and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_greedy_generate_k3_matches_uncached_decoding(base):
    """Batched, prefix-shared, KV-cached decoding of a k=3 member against a plain loop that
    re-runs the whole sequence each step."""
    torch.manual_seed(2)
    mod = DepthEnsembleLanguageModel(base, k_last=3, router="learned", top_k=2)
    with torch.no_grad():
        mod.head.router.weight.normal_(0, 1.0)
    prompts = [base.encode("Say whether the number is even.\n\nInput: 31\nAnswer:"),
               base.encode("Say whether the number is even.\n\nInput: 8\nAnswer:"), base.encode("Input: 5")]
    got, _ = mod.generate_ids(prompts, max_new_tokens=6)
    for ids, new in zip(prompts, got):
        seq, want = list(ids), []
        for _ in range(6):
            with torch.no_grad():
                logits, _ = mod.forward(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
            tok = int(logits[0, -1].argmax())
            want.append(tok)
            seq.append(tok)
            if tok in mod.stop_token_ids:
                break
        assert new == want


def test_shares_vocabulary_and_embeddings(base):
    mod = DepthEnsembleLanguageModel(base, k_last=2)
    assert mod.tokenizer is base.tokenizer and mod.vocab_size == base.vocab_size
    assert mod.model.get_input_embeddings().weight is base.model.get_input_embeddings().weight
    assert not any(p.requires_grad for p in base.model.parameters())
    assert {n for n, p in mod.head.named_parameters()} <= {"norm_weight", "norm_bias", "router.weight", "router.bias"}
    assert all(p.dtype == torch.float32 for p in mod.head.parameters())


def test_relrep_fingerprint_is_the_base_s(base):
    """The matrix fingerprint (input embeddings + vocabulary surfaces) sees the base model, so
    the base's relative-representation matrix applies to the MoD member."""
    from dln_ens.relrep.build import unpack_member
    from dln_ens.relrep.store import fingerprint
    from dln_ens.relrep.vocab import token_surfaces
    mod = DepthEnsembleLanguageModel(base, k_last=2)
    fp = {n: fingerprint(w, token_surfaces(t)) for n, (w, t) in
          (("base", unpack_member("base", base)), ("mod", unpack_member("mod", mod)))}
    assert fp["mod"] == fp["base"]


def test_unsupported_model_names_the_class(tokenizer):
    model = T.OPTForCausalLM(T.OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                         num_attention_heads=2, word_embed_proj_dim=16))
    lm = HFLanguageModel(model, tokenizer, name="opt")
    with pytest.raises(UnsupportedModelError, match="OPTForCausalLM.*LlamaForCausalLM"):
        DepthEnsembleLanguageModel(lm, k_last=2)


def test_lora_without_peft_names_the_extra(base, monkeypatch):
    from dln_ens.config import LoraSettings
    from dln_ens.mod.lora import MissingPeftError
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingPeftError, match=r"pip install 'dln-ens\[lora\]'"):
        DepthEnsembleLanguageModel(base, k_last=2, lora=LoraSettings())


def test_bad_arguments(base):
    with pytest.raises(ValueError, match="k_last"):
        DepthEnsembleLanguageModel(base, k_last=5)
    with pytest.raises(ValueError, match="top_k"):
        DepthEnsembleLanguageModel(base, k_last=2, top_k=3)


def test_head_round_trip_and_mismatches(base, tokenizer, tmp_path):
    mod = DepthEnsembleLanguageModel(base, k_last=3, router="learned", top_k=2)
    with torch.no_grad():
        for p in mod.head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    with pytest.raises(FileExistsError):       # never into the base model's own directory
        mod.save_head(base.model.name_or_path)
    d = mod.save_head(tmp_path / "head")
    meta = json.loads((d / "mod_head.json").read_text())
    assert (meta["k_last"], meta["router"], meta["top_k"]) == (3, "learned", 2)
    back = DepthEnsembleLanguageModel.from_head(base, d)
    for (n, a), (_, b) in zip(mod.head.state_dict().items(), back.head.state_dict().items()):
        assert torch.equal(a, b), n
    torch.testing.assert_close(back.next_token_distribution(TEXTS), mod.next_token_distribution(TEXTS))
    with pytest.raises(ValueError, match="k_last=3"):
        DepthEnsembleLanguageModel.from_head(base, d, k_last=2)
    other = _build(base.model.config.model_type.replace("gpt_neox", "neox"), tokenizer, tmp_path / "other", seed=7)
    with pytest.raises(ValueError, match="different base model"):
        DepthEnsembleLanguageModel.from_head(other, d)
    with pytest.raises(FileNotFoundError, match="tune-mod"):
        DepthEnsembleLanguageModel.from_head(base, tmp_path)


def _mean_target_nll(lm, task: Task, examples) -> float:
    """Independent held-out loss: the protocol's teacher-forced score of " target\\n"."""
    prompts = [f"{task.instruction}\n\nInput: {e.input}\nAnswer:" for e in examples]
    scores = lm.score(prompts, [f" {e.target}\n" for e in examples])
    return -sum(s.logprob for s in scores) / sum(s.num_tokens for s in scores)


def test_tuning_lowers_held_out_loss(tokenizer, tmp_path):
    base = _build("llama", tokenizer, tmp_path / "llama")
    task = _task()
    before = _mean_target_nll(base, task, task.test)
    # the trainer's held-out loss is the protocol's target NLL (k=1 is the base model)
    dev = encode_examples(base, task.instruction, task.dev, "target")
    assert held_out_loss(DepthEnsembleLanguageModel(base, 1), dev, 8, 0) == pytest.approx(
        _mean_target_nll(base, task, task.dev), rel=1e-5)
    mod = DepthEnsembleLanguageModel(base, k_last=2, router="learned")
    res = tune_mod(mod, task, epochs=4, lr=0.05, lambda_kd=0.1, batch_size=16, patience=2, progress=False)
    assert res.best_dev_loss < res.initial_dev_loss
    after = _mean_target_nll(mod, task, task.test)
    assert after < before - 0.2, (before, after)
    assert res.num_trainable == 2 * 32 + 32 * 2 + 2
    # base states kept between epochs or recomputed per batch: the same training
    runs = [tune_mod(DepthEnsembleLanguageModel(base, k_last=2), task, epochs=2, lr=0.05, progress=False,
                     max_feature_bytes=m) for m in (0, 1 << 30)]
    assert [h["dev_loss"] for h in runs[0].history] == pytest.approx([h["dev_loss"] for h in runs[1].history],
                                                                      rel=1e-5)


def test_tune_mod_from_config_writes_beside_base(tokenizer, tmp_path):
    _build("gpt2", tokenizer, tmp_path / "zoo" / "tiny")
    base_files = sorted(p.name for p in (tmp_path / "zoo" / "tiny").iterdir())
    cfg = parse_config({"name": "t", "backends": {
        "tiny": {"type": "hf", "path": str(tmp_path / "zoo" / "tiny")},
        "tiny_mod": {"type": "mod", "base": "tiny", "k_last": 2, "router": "uniform"}},
        "tune_mod": {"backend": "tiny_mod", "task": "mod_even_test", "epochs": 1, "lr": 0.05}})
    res = tune_mod_from_config(cfg)
    assert res.head_dir == default_head_dir(tmp_path / "zoo" / "tiny", 2, "uniform", None)
    assert res.head_dir.parent == (tmp_path / "zoo").resolve()
    assert sorted(p.name for p in (tmp_path / "zoo" / "tiny").iterdir()) == base_files
    cfg.backends["tiny_mod"].head = str(res.head_dir)
    mod = BackendPool(cfg).get("tiny_mod")       # the config's way to load a tuned member
    assert (mod.k_last, mod.router) == (2, "uniform")
