"""`dln-ens serve` and `OpenAILanguageModel` against the in-process backends, over a real uvicorn
server on a free loopback port: the client over the server must give what the backend gives."""
from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import socket
import threading

import httpx
import numpy as np
import pytest
import torch

from dln_ens.lm.hf import HFLanguageModel
from dln_ens.lm.openai import OpenAILanguageModel
from dln_ens.serve.app import create_app
from dln_ens.serve.engine import Engine

from serve_helpers import running

PROMPTS = ["Classify the input.\n\nInput: red cat.\nAnswer:", "Let's think", "Ünïcödé – ✓ 42"]
CONTEXTS = ["Classify the input.\n\nInput: the dog\nAnswer:", "Answer:", "Input: caf", "Input: café", "go ",
            "Input: two"]
TARGETS = [" Yes", "Yes", "é→ ok", "→ ok", "→ left", " ✓"]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return HFLanguageModel.from_pretrained(tiny_gpt2_dir, name="gpt2", batch_size=4)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return HFLanguageModel.from_pretrained(tiny_llama_dir, name="llama", batch_size=4)


@pytest.fixture(scope="module")
def served_gpt2(gpt2):
    with running(create_app(Engine(gpt2))) as url:
        yield url


def client(url, model, **kw):
    return OpenAILanguageModel(url, model, timeout=30, max_retries=0, **kw)


def test_awkward_boundaries_are_what_they_claim(gpt2, llama):
    """The pairs split a multi-byte character across tokens in the target and at the context's
    end, and include a target without a leading space (preconditions of the tests below)."""
    surfaces = [gpt2.tokenizer.convert_ids_to_tokens(t) for _, t in gpt2.split_pairs(CONTEXTS, TARGETS)]
    assert surfaces[2][:2] == ["Ã", "©"]                        # é in two byte tokens
    assert "Ã" in gpt2.tokenizer.convert_ids_to_tokens(gpt2.encode("Input: café"))
    for lm in (gpt2, llama):
        for c, t in zip(CONTEXTS, TARGETS):
            ctx, whole = lm.encode(c), lm.encode(c + t)
            assert whole[:len(ctx)] == ctx, (lm.name, c, t)     # rule 1 of split_pairs


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_client_over_server_equals_in_process(which, request):
    lm = request.getfixturevalue(which)
    with running(create_app(Engine(lm))) as url, client(url, which, batch_size=2, concurrency=3) as c:
        want, got = lm.generate(PROMPTS, max_new_tokens=8), c.generate(PROMPTS, max_new_tokens=8)
        assert [g.text for g in got] == [g.text for g in want]
        assert [g.num_tokens for g in got] == [g.num_tokens for g in want]
        assert [g.logprob for g in got] == pytest.approx([g.logprob for g in want], abs=1e-4)
        stop = c.generate(PROMPTS, max_new_tokens=8, stop=["a", "\n"])
        assert [g.text for g in stop] == [g.text for g in lm.generate(PROMPTS, max_new_tokens=8, stop=["a", "\n"])]
        sampled = lm.generate(PROMPTS, max_new_tokens=6, temperature=1.3, seed=7)
        assert [g.text for g in c.generate(PROMPTS, max_new_tokens=6, temperature=1.3, seed=7)] == \
            [g.text for g in sampled]

        want, got = lm.score(CONTEXTS, TARGETS), c.score(CONTEXTS, TARGETS)
        assert [s.num_tokens for s in got] == [s.num_tokens for s in want]
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
        classes = ["Yes", "No", "(A)"]
        np.testing.assert_allclose(c.next_token_logprobs(CONTEXTS[:3], classes),
                                   lm.next_token_logprobs(CONTEXTS[:3], classes), atol=1e-4)
        for aggregate in ("sum", "max"):   # "Yes." starts with "Yes"'s token: told apart by its echoed text
            np.testing.assert_allclose(c.next_token_logprobs(CONTEXTS[:3], ["Yes|Yes.", "No"], aggregate=aggregate),
                                       lm.next_token_logprobs(CONTEXTS[:3], ["Yes|Yes.", "No"], aggregate=aggregate),
                                       atol=1e-4)


def test_client_with_tokenizer_is_exact_where_text_cannot_be(llama, tiny_llama_dir):
    """"Answer: Y" + "es": no token boundary at the context's end ("▁Yes" straddles it), so
    split_pairs tokenises the target alone; with the tokenizer the client sends those ids."""
    ctx, tgt = ["Answer: Y", "Answer:"], ["es", " No"]
    assert llama.encode("Answer: Yes")[:len(llama.encode("Answer: Y"))] != llama.encode("Answer: Y")
    with running(create_app(Engine(llama))) as url, client(url, "llama", tokenizer=str(tiny_llama_dir)) as c:
        want, got = llama.score(ctx, tgt), c.score(ctx, tgt)
        assert [s.num_tokens for s in got] == [s.num_tokens for s in want]
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
        np.testing.assert_allclose(c.next_token_logprobs(ctx, ["es", "No"]),
                                   llama.next_token_logprobs(ctx, ["es", "No"]), atol=1e-4)
        ctx = ["Answer: ", "Answer:"]   # after "Answer: ", " Yes" and "Yes" start with the same token
        for aggregate in ("sum", "max"):
            np.testing.assert_allclose(c.next_token_logprobs(ctx, ["Yes|yes", "No"], aggregate=aggregate),
                                       llama.next_token_logprobs(ctx, ["Yes|yes", "No"], aggregate=aggregate),
                                       atol=1e-4)


def reference_token_logprobs(lm, ids: list[int]) -> list[float]:
    """Teacher-forced log p(token i | tokens < i) straight from transformers."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_token_ids_shape_and_values(gpt2, served_gpt2):
    ids = gpt2.encode("Input: café→ ok")
    body = {"model": "gpt2", "prompt": [ids, ids[:4]], "max_tokens": 1, "echo": True, "logprobs": 3,
            "temperature": 0}
    r = httpx.post(served_gpt2 + "/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1]
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(reference_token_logprobs(gpt2, ids), abs=1e-4)
    assert "".join(lp["tokens"]).startswith("Input: café→ ok")
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    with torch.no_grad():
        rows = torch.log_softmax(gpt2.model(torch.tensor([ids])).logits[0].float(), -1)
    for i, (top, chosen) in enumerate(zip(lp["top_logprobs"][1:len(ids)], lp["token_logprobs"][1:])):
        best = rows[i].topk(3).values.tolist()    # byte tokens share the text "�": keys may merge
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(min(abs(v - b) for b in best + [chosen]) < 1e-4 for v in top.values())
    greedy = lp["top_logprobs"][-1]   # the generated token is the argmax
    assert lp["token_logprobs"][-1] == pytest.approx(max(greedy.values()), abs=1e-6)
    assert out["usage"]["prompt_tokens"] == len(ids) + 4 and out["usage"]["completion_tokens"] == 2


def lm_eval_loglikelihood(url, model, tokenizer, requests):
    """lm-evaluation-harness' `local-completions` loglikelihood, rewritten: the pair split of
    `TemplateLM._encode_pair` (trailing context spaces move into the continuation, tokenizer
    without special tokens), token-id prompts with echo, logprobs 1 and max_tokens 1, and the
    answer read as sum(token_logprobs[ctxlen:-1]) with is_greedy from top_logprobs."""
    prompts, ctxlens = [], []
    for context, continuation in requests:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        prompts.append(ctx + whole[len(ctx):])
        ctxlens.append(len(ctx))
    body = {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    out = httpx.post(url + "/completions", json=body, timeout=60).json()
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return res


def test_lm_eval_local_completions_request_equals_in_process_score(gpt2, served_gpt2):
    # contexts end without whitespace, as multiple-choice tasks do: lm-eval always moves trailing
    # whitespace into the continuation, split_pairs only when the context's ids are not a prefix
    contexts = ["Question: is the cat red?\nAnswer:", "Input: two dogs\nAnswer:", "Answer:"]
    choices = [" Yes", " No", "(A)"]
    pairs = [(c, x) for c in contexts for x in choices]
    got = lm_eval_loglikelihood(served_gpt2, "gpt2", gpt2.tokenizer, pairs)
    want = gpt2.score([c for c, _ in pairs], [x for _, x in pairs])
    assert [g[0] for g in got] == pytest.approx([w.logprob for w in want], abs=1e-4)
    dist = gpt2.next_token_distribution([c for c, _ in pairs])
    for (ll, greedy), (c, x), row in zip(got, pairs, dist):
        if len(gpt2.split_pairs([c], [x])[0][1]) == 1:
            assert greedy == (row.argmax().item() == gpt2.split_pairs([c], [x])[0][1][0])


def test_concurrent_requests_share_backend_calls(gpt2):
    engine = Engine(gpt2)
    gate, entered = threading.Event(), threading.Event()
    complete = engine.complete

    def slow_first(params, prompts):
        entered.set()
        assert gate.wait(20)
        return complete(params, prompts)

    engine.complete = slow_first
    app = create_app(engine)
    with running(app) as url:
        body = {"model": "gpt2", "max_tokens": 2, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            first = pool.submit(httpx.post, url + "/completions", json={**body, "prompt": "a"}, timeout=30)
            assert entered.wait(20)
            rest = [pool.submit(httpx.post, url + "/completions", json={**body, "prompt": [p]}, timeout=30)
                    for p in PROMPTS * 2 + ["b", "c"]]
            for _ in range(200):   # bounded: until the 8 requests are queued behind the first
                if app.state.batcher._queue.qsize() >= 8:
                    break
                threading.Event().wait(0.02)
            gate.set()
            responses = [first.result()] + [f.result() for f in rest]
        assert all(r.status_code == 200 for r in responses)
        assert engine.calls == 2, "the 8 queued requests are answered by one backend call"
        texts = [r.json()["choices"][0]["text"] for r in responses[1:7]]
        assert texts == [g.text for g in gpt2.generate(PROMPTS * 2, max_new_tokens=2)]


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ({"prompt": [[1, 2], [10 ** 9]]}, 400, "prompt"),
    ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "stream": True}, 400, "stream"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"max_tokens": 1}, 400, "prompt"),
])
def test_bad_requests_get_openai_error_bodies(served_gpt2, body, status, param):
    r = httpx.post(served_gpt2 + "/completions", json={"model": "gpt2", **body}, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_invalid_json_and_too_long_prompts_are_400(served_gpt2):
    r = httpx.post(served_gpt2 + "/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(served_gpt2 + "/completions", json={"prompt": "cat " * 400, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "max_position_embeddings" in r.json()["error"]["message"]
    ok = httpx.post(served_gpt2 + "/completions", json={"prompt": "cat", "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200, "the server still answers after a failed request"


def test_models_and_bearer_token(gpt2, monkeypatch):
    with running(create_app(Engine(gpt2), api_key="s3cret-key")) as url:
        assert httpx.get(url + "/models", timeout=30).status_code == 401
        r = httpx.get(url + "/models", headers={"Authorization": "Bearer s3cret-key"}, timeout=30)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["gpt2"]
        monkeypatch.setenv("TEST_SERVE_KEY", "s3cret-key")
        with client(url, "gpt2", api_key_env="TEST_SERVE_KEY") as c:
            assert c.generate(["a"], max_new_tokens=1)[0].num_tokens == 1
            assert "s3cret" not in repr(c)
        monkeypatch.setenv("TEST_SERVE_KEY", "bad-k3y-value")
        with client(url, "gpt2", api_key_env="TEST_SERVE_KEY") as c:
            with pytest.raises(Exception, match="401.*api_key_env") as e:
                c.generate(["a"], max_new_tokens=1)
            assert "bad-k3y" not in str(e.value)


@pytest.fixture(scope="module")
def ensemble(gpt2, llama, tmp_path_factory):
    from dln_ens.ensemble.model import EnsembleLanguageModel
    from dln_ens.relrep.build import build_matrices

    members = {"llama": llama, "gpt2": gpt2}
    mats = tmp_path_factory.mktemp("serve-mat")
    build_matrices(members, mats, topk=16, min_anchors=10, progress=False, value_dtype="float32")
    return EnsembleLanguageModel(members, main="llama", matrices=mats, name="ens", batch_size=4)


def test_served_ensemble_equals_in_process(ensemble):
    """Main member llama (BOS, SentencePiece leading space): the echo must condition gpt2 on the
    same text as the in-process ensemble score."""
    with running(create_app(Engine(ensemble))) as url, client(url, "ens", batch_size=3) as c:
        want, got = ensemble.generate(PROMPTS, max_new_tokens=6), c.generate(PROMPTS, max_new_tokens=6)
        assert [g.text for g in got] == [g.text for g in want]
        assert [g.logprob for g in got] == pytest.approx([g.logprob for g in want], abs=1e-4)
        want, got = ensemble.score(CONTEXTS, TARGETS), c.score(CONTEXTS, TARGETS)
        assert [s.num_tokens for s in got] == [s.num_tokens for s in want]
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
        np.testing.assert_allclose(c.next_token_logprobs(CONTEXTS[:3], ["Yes", "No"]),
                                   ensemble.next_token_logprobs(CONTEXTS[:3], ["Yes", "No"]), atol=1e-4)


def test_served_mod_member_equals_in_process(gpt2):
    from dln_ens.mod.model import DepthEnsembleLanguageModel

    mod = DepthEnsembleLanguageModel(gpt2, 2, router="uniform")
    mod.name = "mod"
    with running(create_app(Engine(mod))) as url, client(url, "mod") as c:
        assert [g.text for g in c.generate(PROMPTS, max_new_tokens=5)] == \
            [g.text for g in mod.generate(PROMPTS, max_new_tokens=5)]
        want, got = mod.score(CONTEXTS, TARGETS), c.score(CONTEXTS, TARGETS)
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
        assert [s.logprob for s in got] != pytest.approx([s.logprob for s in gpt2.score(CONTEXTS, TARGETS)], abs=1e-3)


def test_lm_eval_local_completions_on_a_served_model(gpt2, served_gpt2, tiny_gpt2_dir, tmp_path, monkeypatch):
    """lm-evaluation-harness itself: a multiple-choice task from local files, evaluated with its
    `local-completions` model against the server; its log-likelihoods are the in-process scores."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[test]')")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_CACHE", str(tmp_path / "cache"))):
        monkeypatch.setenv(var, value)
    docs = [{"question": q, "choices": ["Yes", "No", "(A)"], "label": i % 3}
            for i, q in enumerate(["is the cat red?", "two dogs walk left", "café → ok"])]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "served_toy_mc.yaml").write_text(
        "task: served_toy_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    # lm-eval indexes its thousands of built-in tasks unless told not to (30 s)
    only_ours = {"include_defaults": False} if "include_defaults" in inspect.signature(TaskManager).parameters else {}
    out = simple_evaluate(model="local-completions",
                          model_args=f"base_url={served_gpt2}/completions,model=gpt2,tokenizer={tiny_gpt2_dir},"
                                     f"tokenizer_backend=huggingface,num_concurrent=2,max_retries=1",
                          tasks=["served_toy_mc"], task_manager=TaskManager(include_path=str(tmp_path), **only_ours),
                          log_samples=True)
    samples = out["samples"]["served_toy_mc"]
    assert len(samples) == len(docs)
    for s in samples:
        doc = s["doc"]
        lls = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in s["resps"]]
        want = gpt2.score([f"Question: {doc['question']}\nAnswer:"] * 3, [" " + c for c in doc["choices"]])
        assert lls == pytest.approx([w.logprob for w in want], abs=1e-4)


def write_conf(tmp_path, model_dir):
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps({"name": "s", "backends": {"tiny": {"type": "hf", "path": str(model_dir)}}}))
    return conf


def test_serve_command_refuses_before_loading(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    """A missing key variable or backend name fails before anything loads."""
    from dln_ens.cli import main

    conf = write_conf(tmp_path, tiny_gpt2_dir)
    assert main(["serve", "--conf", str(conf), "--backend", "nope"]) == 2
    assert "no backend 'nope'; defined: tiny" in capsys.readouterr().err
    env_var = "DLN_ENS_TEST_UNSET_KEY"
    monkeypatch.delenv(env_var, raising=False)
    assert main(["serve", "--conf", str(conf), "--backend", "tiny", "--api-key-env", env_var]) == 2
    assert f"--api-key-env {env_var}: the environment variable is not set" in capsys.readouterr().err


@pytest.mark.slow   # a subprocess that imports torch and transformers: ~10 s on an idle laptop
def test_dln_ens_serve_command(tiny_gpt2_dir, tmp_path):
    """The command itself, in a subprocess, serving the configured backend on loopback."""
    import subprocess
    import sys
    import time

    conf = write_conf(tmp_path, tiny_gpt2_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dln_ens", "serve", "--conf", str(conf), "--backend", "tiny",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, r = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert r is not None and r.json()["data"][0]["id"] == "tiny", proc.stdout.read1().decode() if r is None else r.text
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                         json={"prompt": "Answer:", "max_tokens": 3, "temperature": 0}, timeout=30).json()
        lm = HFLanguageModel.from_pretrained(tiny_gpt2_dir)
        assert out["choices"][0]["text"] == lm.generate(["Answer:"], max_new_tokens=3)[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_echo_with_one_generated_token_is_read_the_same(gpt2, served_gpt2):
    """``echo_max_tokens: 1`` (servers that refuse max_tokens 0): the generated token is ignored."""
    with client(served_gpt2, "gpt2", echo_max_tokens=1) as c:
        got = c.score(CONTEXTS, TARGETS)
    want = gpt2.score(CONTEXTS, TARGETS)
    assert [s.num_tokens for s in got] == [s.num_tokens for s in want]
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)


@pytest.mark.parametrize("which", ["gpt2", "ensemble"])
def test_recomputed_logprobs_equal_the_decodings_own(which, request):
    """``logprobs: 2`` recomputes teacher-forced log-probs (and the top tokens) over prompt and
    generated ids; ``logprobs: 0`` returns the decoding's own: the two agree."""
    lm = request.getfixturevalue(which)
    with running(create_app(Engine(lm))) as url:
        body = {"model": lm.name, "prompt": PROMPTS, "max_tokens": 5, "temperature": 0}
        own = httpx.post(url + "/completions", json={**body, "logprobs": 0}, timeout=60).json()["choices"]
        again = httpx.post(url + "/completions", json={**body, "logprobs": 2, "echo": True}, timeout=60).json()["choices"]
    for a, b in zip(own, again):
        n = len(a["logprobs"]["token_logprobs"])
        assert b["text"].endswith(a["text"]) and b["logprobs"]["tokens"][-n:] == a["logprobs"]["tokens"]
        assert b["logprobs"]["token_logprobs"][-n:] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-4)
        for top, lp in zip(b["logprobs"]["top_logprobs"][-n:], a["logprobs"]["token_logprobs"]):
            assert max(top.values()) == pytest.approx(lp, abs=1e-4), "greedy: the chosen token is the top one"
