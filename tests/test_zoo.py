"""The zoo (size "tiny"): families and architectures differ, saved members load back with the
Auto classes, tokenizers round-trip the corpus exactly, builds are deterministic and reused."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dln_ens.config import ZooConfig
from dln_ens.data import load_task
from dln_ens.zoo.build import build_member, build_zoo, member_seed
from dln_ens.zoo.corpus import member_corpus, tokenizer_corpus
from dln_ens.zoo.models import member_specs
from dln_ens.zoo.train import encode_docs, lm_loss


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: thread start-up costs more than the math, and the test machine is shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    return build_zoo(ZooConfig(dir=str(d), size="tiny", seed=0))


@pytest.fixture(scope="module")
def loaded(zoo):
    return {n: (AutoModelForCausalLM.from_pretrained(p), AutoTokenizer.from_pretrained(p)) for n, p in zoo.items()}


def test_members_differ_in_family_and_architecture(zoo, loaded):
    assert len(zoo) >= 3
    archs = {type(m).__name__ for m, _ in loaded.values()}
    assert len(archs) == len(zoo), archs
    models = set()
    for name, path in zoo.items():
        tj = json.loads((path / "tokenizer.json").read_text())
        models.add((tj["model"]["type"], json.dumps(tj["pre_tokenizer"], sort_keys=True)))
        assert list(path.glob("*.safetensors")), f"{name} not saved as safetensors"
    assert len(models) == len(zoo), "tokenizer families must differ"
    assert len({len(t) for _, t in loaded.values()}) == len(zoo), "vocabulary sizes must differ"


def test_special_tokens_and_config_ids(loaded):
    for name, (model, tok) in loaded.items():
        for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
            assert getattr(tok, attr) is not None, (name, attr)
        assert model.config.eos_token_id == tok.eos_token_id, name
        assert model.get_output_embeddings().weight.shape[0] >= len(tok), name
        # the EOS token is one token and decodes to nothing when special tokens are skipped
        assert tok.decode([tok.eos_token_id], skip_special_tokens=True) == ""
        ids = tok("Answer:")["input_ids"]
        assert tok.eos_token_id not in ids
        if tok.bos_token_id != tok.eos_token_id:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_tokenizers_round_trip_corpus_exactly(loaded):
    texts = tokenizer_corpus()[::7] + member_corpus("zoo-neox", 0, 20, 1)[:50] + [
        "  two spaces\n\n\nthree newlines\tand a tab ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./ 0123456789\n",
        "Answer: Yes\n", "\nstarts with a newline", "ends with spaces  "]
    for name, (_, tok) in loaded.items():
        for t in texts:
            assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t, (name, t)
            assert tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t, (name, t)


def test_prompt_tokens_are_a_prefix_of_prompt_plus_answer(loaded):
    """Scoring a target after a forward prompt relies on the prompt tokenizing the same alone."""
    task = load_task("navigate")
    for name, (_, tok) in loaded.items():
        for e in task.dev[:20]:
            ctx = f"{task.instruction}\n\nInput: {e.input}\nAnswer:"
            ids = tok(ctx)["input_ids"]
            assert tok(ctx + f" {e.target}\n")["input_ids"][:len(ids)] == ids, name


def test_saved_models_run_and_match_training_loss(loaded):
    """The training loss equals transformers' own causal-LM loss on an unpadded sequence."""
    for name, (model, tok) in loaded.items():
        (seq,) = encode_docs(tok, ["What is the capital of Zorbia?\n"])
        ids = torch.tensor([seq])
        with torch.no_grad():
            ours = lm_loss(model, ids, torch.ones_like(ids))
            ref = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(ours) and torch.allclose(ours, ref, atol=1e-5), name


def test_build_is_deterministic_and_reused(zoo, tmp_path):
    other = build_zoo(ZooConfig(dir=str(tmp_path / "again"), size="tiny", seed=0))
    for name, path in zoo.items():
        a, b = load_file(path / "model.safetensors"), load_file(other[name] / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert (path / "tokenizer.json").read_text() == (other[name] / "tokenizer.json").read_text()
    manifest = json.loads((tmp_path / "again" / "zoo.json").read_text())
    first = json.loads((next(iter(zoo.values())).parent / "zoo.json").read_text())
    for name in zoo:
        assert manifest["members"][name]["first_losses"] == first["members"][name]["first_losses"]
        assert manifest["members"][name]["final_loss"] < manifest["members"][name]["first_losses"][0]
    # an up-to-date member is not rebuilt
    stamps = {n: os.stat(p / "model.safetensors").st_mtime_ns for n, p in other.items()}
    build_zoo(ZooConfig(dir=str(tmp_path / "again"), size="tiny", seed=0))
    assert stamps == {n: os.stat(p / "model.safetensors").st_mtime_ns for n, p in other.items()}
    assert not [p for p in (tmp_path / "again").iterdir() if p.name.startswith(".")], "temporary dirs left"


def test_different_seed_gives_different_weights(zoo, tmp_path):
    spec = member_specs("tiny")[0]
    build_member(spec, member_seed(1, 0), tokenizer_corpus(), tmp_path)
    a = load_file(zoo[spec.name] / "model.safetensors")
    b = load_file(tmp_path / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_report_greedy_matches_transformers_generate(loaded):
    """The report's batched, left-padded greedy decoding equals transformers' own generate
    run one prompt at a time."""
    from dln_ens.zoo.report import forward_prompt, greedy
    task = load_task("facts_qa")
    prompts = [forward_prompt(task.instruction, e.input) for e in task.dev[:3]] + ["Answer Yes or No."]
    for name, (model, tok) in loaded.items():
        ours = greedy(model, tok, prompts, max_new_tokens=6)
        for p, o in zip(prompts, ours):
            ids = torch.tensor([tok(p)["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            ref = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
            assert o == ref, (name, p)
