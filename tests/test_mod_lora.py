"""Mixture-of-Depths with LoRA adapters (peft): exactness against transformers and peft
themselves, the adapter files, which parameters train, the shared base left untouched, config errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dln_ens.backends import BackendPool
from dln_ens.config import ConfigError, LoraSettings, parse_config
from dln_ens.mod import lora as lora_files
from dln_ens.mod.model import DepthEnsembleLanguageModel, default_head_dir
from dln_ens.mod.tune import encode_examples, extract_features, feature_losses, tune_mod, tune_mod_from_config
from test_mod import TEXTS, _batch, _build, _ref_layer_states, _task, _tasks, base, tokenizer  # noqa: F401 (fixtures; _tasks registers mod_even_test)

peft = pytest.importorskip("peft", reason="LoRA tests need peft: pip install 'dln-ens[lora]'")


def _lora_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def _base_logits(base, input_ids, mask):
    with torch.no_grad():
        return base.model(input_ids=input_ids, attention_mask=mask).logits.float()


def _randomize_adapters(mod, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in mod.model.named_parameters():
            if "lora_" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def test_zero_b_k1_equals_base_and_base_untouched(base):
    input_ids, mask = _batch(base, TEXTS)
    want = _base_logits(base, input_ids, mask)
    base_state = {k: v.clone() for k, v in base.model.state_dict().items()}
    mod = DepthEnsembleLanguageModel(base, k_last=1, router="uniform", lora=LoraSettings(r=4))
    names = _lora_names(mod.model)
    assert names and all(not p.any() for n, p in mod.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        got, _ = mod.forward(input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    # adapters with B != 0 change the member, and never the shared base model
    _randomize_adapters(mod)
    with torch.no_grad():
        changed, _ = mod.forward(input_ids, mask)
    assert (changed[real] - want[real]).abs().max() > 1e-2
    assert not _lora_names(base.model)
    torch.testing.assert_close(_base_logits(base, input_ids, mask), want, rtol=0, atol=0)
    assert base.model.state_dict().keys() == base_state.keys()
    assert all(torch.equal(v, base_state[k]) for k, v in base.model.state_dict().items())
    # the member's backbone runs on the base's own weight tensors (no copy of the weights)
    shared = {id(p) for p in base.model.parameters()}
    assert all(id(p) in shared for n, p in mod.model.named_parameters() if "lora_" not in n)


def test_late_layers_only(base):
    mod = DepthEnsembleLanguageModel(base, k_last=2, lora=LoraSettings(r=2, layers="late"))
    layers = {int(part) for n in _lora_names(mod.model) for part in n.split(".") if part.isdigit()}
    assert layers == {2, 3}     # 4 decoder layers, the last k_last = 2
    every = DepthEnsembleLanguageModel(base, k_last=2, lora=LoraSettings(r=2, layers="all"))
    assert {int(part) for n in _lora_names(every.model) for part in n.split(".") if part.isdigit()} == {0, 1, 2, 3}


def test_adapter_round_trip_and_peft_reads_it(base, tmp_path):
    mod = DepthEnsembleLanguageModel(base, k_last=2, router="learned", lora=LoraSettings(r=4, layers="late"))
    _randomize_adapters(mod)
    with torch.no_grad():
        for p in mod.head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    d = mod.save_head(tmp_path / "head")
    assert {p.name for p in d.iterdir()} == {"mod_head.json", "mod_head.safetensors", lora_files.ADAPTER_CONFIG,
                                             lora_files.ADAPTER_WEIGHTS}
    back = DepthEnsembleLanguageModel.from_head(base, d)
    assert back.peft is not None and back.peft is not mod.peft
    torch.testing.assert_close(back.next_token_distribution(TEXTS), mod.next_token_distribution(TEXTS),
                               rtol=0, atol=0)
    assert [g.text for g in back.generate(TEXTS, max_new_tokens=5)] == \
        [g.text for g in mod.generate(TEXTS, max_new_tokens=5)]

    # k_last = 1 (plain LoRA): the member equals peft's own model loaded from the same directory
    plain = DepthEnsembleLanguageModel(base, k_last=1, router="uniform", lora=LoraSettings(r=4))
    _randomize_adapters(plain, seed=3)
    d1 = plain.save_head(tmp_path / "plain")
    from transformers import AutoModelForCausalLM
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.model.name_or_path), str(d1))
    input_ids, mask = _batch(base, TEXTS)
    with torch.no_grad():
        want = ref(input_ids=input_ids, attention_mask=mask).logits.float()
        got, _ = DepthEnsembleLanguageModel.from_head(base, d1).forward(input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)

    # an adapter file that is not the one saved with the head is refused
    (d / lora_files.ADAPTER_WEIGHTS).write_bytes((d1 / lora_files.ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="checksum"):
        DepthEnsembleLanguageModel.from_head(base, d)
    # a head without LoRA never lands beside an adapter it would not replace
    with pytest.raises(FileExistsError, match="LoRA adapter"):
        DepthEnsembleLanguageModel(base, k_last=2).save_head(d)


def test_only_lora_norm_and_router_get_gradients(tokenizer, tmp_path):
    base = _build("llama", tokenizer, tmp_path / "llama")
    mod = DepthEnsembleLanguageModel(base, k_last=2, router="learned", lora=LoraSettings(r=4))
    task = _task()
    items = encode_examples(mod, task.instruction, task.train[:8], "target")
    ce, kd, _ = feature_losses(mod, extract_features(mod, items, mod.pad_token_id))
    (ce + 0.1 * kd).backward()
    for n, p in mod.model.named_parameters():
        is_lora = "lora_" in n
        assert p.requires_grad == is_lora, n
        assert (p.grad is not None) == is_lora, n
        if "lora_B" in n:
            assert p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in base.model.parameters())
    for n, p in mod.head.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
    heads_names = {n.split(".", 1)[1] for n in mod.trainable_parameters() if n.startswith("head.")}
    assert heads_names == {"norm_weight", "router.weight", "router.bias"}


def test_tuning_with_lora_trains_adapters_and_leaves_base(tokenizer, tmp_path):
    base = _build("gpt2", tokenizer, tmp_path / "gpt2")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    task = _task()
    # plain LoRA: k_last 1, head frozen; trainable = 4 layers x r x (d_in + d_out) of GPT-2's c_attn
    plain = DepthEnsembleLanguageModel(base, k_last=1, router="uniform", lora=LoraSettings(r=4))
    head0 = {k: v.clone() for k, v in plain.head.state_dict().items()}
    res = tune_mod(plain, task, epochs=2, lr=0.01, train_head=False, progress=False)
    assert res.num_trainable == 4 * 4 * (32 + 3 * 32)
    assert res.best_dev_loss < res.initial_dev_loss
    assert all(torch.equal(v, head0[k]) for k, v in plain.head.state_dict().items())
    # MoD + LoRA: both train
    mod = DepthEnsembleLanguageModel(base, k_last=2, router="learned", lora=LoraSettings(r=4, layers="late"))
    res = tune_mod(mod, task, epochs=2, lr=0.01, progress=False)
    assert res.num_trainable == 2 * 4 * (32 + 3 * 32) + (2 * 32 * 2) + (32 * 2 + 2)
    assert res.best_dev_loss < res.initial_dev_loss
    assert any(p.abs().sum() > 0 for n, p in mod.model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())
    assert not _lora_names(base.model)


def _cfg(tmp_path, lora, **tune):
    return {"name": "t", "backends": {
        "tiny": {"type": "hf", "path": str(tmp_path / "zoo" / "tiny")},
        "tiny_mod": {"type": "mod", "base": "tiny", "k_last": 2, "router": "learned"}},
        "tune_mod": {"backend": "tiny_mod", "task": "mod_even_test", "epochs": 1, "lr": 0.05, "lora": lora, **tune}}


@pytest.mark.parametrize("lora,tune,key", [
    ({"r": 0}, {}, "tune_mod.lora.r"),
    ({"alpha": -1}, {}, "tune_mod.lora.alpha"),
    ({"dropout": 1.0}, {}, "tune_mod.lora.dropout"),
    ({"layers": "middle"}, {}, "tune_mod.lora.layers"),
    ({"rank": 8}, {}, "tune_mod.lora.rank"),
    ({"target_modules": []}, {}, "tune_mod.lora.target_modules"),
    ({"target_modules": "q_proj"}, {}, "tune_mod.lora.target_modules"),
    ({"lr": 0}, {}, "tune_mod.lora.lr"),
    (True, {}, "tune_mod.lora"),
    (None, {"train_head": False}, "tune_mod.train_head"),
    (False, {"train_head": False}, "tune_mod.train_head"),
])
def test_bad_lora_settings_name_the_key(tmp_path, lora, tune, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        parse_config(_cfg(tmp_path, lora, **tune), check_paths=False)


def test_lora_false_or_null_is_no_lora(tmp_path):
    for off in (False, None):
        assert not parse_config(_cfg(tmp_path, off), check_paths=False).tune_mod.lora


def test_unknown_target_module_names_the_key(tokenizer, tmp_path):
    _build("gpt2", tokenizer, tmp_path / "zoo" / "tiny")
    cfg = parse_config(_cfg(tmp_path, {"target_modules": ["q_proj"]}))
    with pytest.raises(ConfigError, match="tune_mod.lora.target_modules.*c_attn"):
        tune_mod_from_config(cfg)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_embeddings_or_lm_head_is_refused(tokenizer, tmp_path, target):
    base = _build("llama", tokenizer, tmp_path / "llama")
    with pytest.raises(lora_files.LoraTargetError, match="embeddings or the LM head"):
        DepthEnsembleLanguageModel(base, k_last=2, lora=LoraSettings(target_modules=[target]))
    assert not _lora_names(base.model)


def test_tune_mod_with_lora_from_config_and_pool(tokenizer, tmp_path):
    _build("gpt2", tokenizer, tmp_path / "zoo" / "tiny")
    base_files = sorted(p.name for p in (tmp_path / "zoo" / "tiny").iterdir())
    cfg = parse_config(_cfg(tmp_path, {"r": 4, "layers": "late"}))
    res = tune_mod_from_config(cfg)
    assert res.head_dir == default_head_dir(tmp_path / "zoo" / "tiny", 2, "learned", None, lora=True)
    assert sorted(p.name for p in (tmp_path / "zoo" / "tiny").iterdir()) == base_files
    assert json.loads((res.head_dir / "mod_head.json").read_text())["lora"]["weights"] == lora_files.ADAPTER_WEIGHTS

    # a `mod` backend whose head holds the adapter applies it; the shared `hf` backend stays plain
    cfg.backends["tiny_mod"].head = str(res.head_dir)
    pool = BackendPool(cfg)
    plain, member = pool.get("tiny"), pool.get("tiny_mod")
    assert member.peft is not None and not _lora_names(plain.model)
    input_ids, mask = _batch(plain, TEXTS)
    with torch.no_grad():
        got, _ = member.forward(input_ids, mask)
        want = plain.model(input_ids=input_ids, attention_mask=mask).logits.float()
    assert (got - want)[mask.bool()].abs().max() > 1e-4    # the member is tuned, the base is not
    # reference: peft's own model from the head directory, its last two layers' states through
    # the head's norms, the LM head and the router, written out here
    from transformers import AutoModelForCausalLM
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "zoo" / "tiny")),
                                         str(res.head_dir)).base_model.model
    out, h_prev, h_last = _ref_layer_states(ref, input_ids, mask)
    hd = member.head
    with torch.no_grad():
        z = [F.layer_norm(h, (h.shape[-1],), hd.norm_weight[j], hd.norm_bias[j], hd.eps) @ ref.lm_head.weight.T
             for j, h in enumerate([h_prev, h_last])]
        w = hd.router(out.hidden_states[-1]).softmax(-1)
    real = mask.bool()
    torch.testing.assert_close(got[real], (w[..., :1] * z[0] + w[..., 1:] * z[1])[real], rtol=1e-4, atol=1e-4)


def test_adapter_init_is_seeded(base):
    def a_weights(seed):
        mod = DepthEnsembleLanguageModel(base, k_last=1, router="uniform", lora=LoraSettings(r=2), lora_seed=seed)
        return torch.cat([p.flatten() for n, p in mod.model.named_parameters() if "lora_A" in n])
    torch.manual_seed(123)
    first = a_weights(0)
    state = torch.random.get_rng_state()
    assert torch.equal(a_weights(0), first) and not torch.equal(a_weights(1), first)
    assert torch.equal(torch.random.get_rng_state(), state)    # the caller's random stream is untouched


def test_lora_member_in_an_ensemble_next_to_its_base(base):
    """The LoRA member and its own (shared, plain) base in one ensemble: each keeps its outputs."""
    from dln_ens.ensemble.model import EnsembleLanguageModel
    mod = DepthEnsembleLanguageModel(base, k_last=2, lora=LoraSettings(r=4))
    _randomize_adapters(mod)
    for main, alone in (("m", mod), ("b", base)):
        ens = EnsembleLanguageModel({"m": mod, "b": base}, main=main, method="main")
        torch.testing.assert_close(ens.next_token_distribution(TEXTS), alone.next_token_distribution(TEXTS))
        assert [g.text for g in ens.generate(TEXTS, max_new_tokens=4)] == \
            [g.text for g in alone.generate(TEXTS, max_new_tokens=4)]
    with torch.no_grad():
        want = torch.log_softmax(base.model(**base.tokenizer(TEXTS[:1], return_tensors="pt")).logits[0, -1].float(), -1)
    torch.testing.assert_close(base.next_token_distribution(TEXTS[:1])[0], want, rtol=1e-5, atol=1e-5)
    assert (mod.next_token_distribution(TEXTS[:1])[0] - want).abs().max() > 1e-2
