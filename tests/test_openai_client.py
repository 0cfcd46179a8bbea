"""`OpenAILanguageModel` failures against scripted servers (down, 500, 429, bad JSON, timeouts),
the `openai` backend type in configs, and a DLN-1 run on a served model."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dln_ens.config import ConfigError, config_to_dict, parse_config
from dln_ens.lm.openai import EndpointError, OpenAILanguageModel

from serve_helpers import running

OK = {"choices": [{"index": 0, "text": " hi", "finish_reason": "length",
                   "logprobs": {"tokens": [" hi"], "token_logprobs": [-0.5], "top_logprobs": [{" hi": -0.5}],
                                "text_offset": [0]}}]}


def scripted(actions: list):
    """A completions endpoint answering request i with actions[i] (the last one repeats):
    an HTTP status, ("sleep", s), "garbage" or "ok"; ``seen`` logs (time, body) per request."""
    seen = []

    async def completions(request):
        seen.append((time.monotonic(), json.loads(await request.body())))
        act = actions[min(len(seen), len(actions)) - 1]
        if act == "ok":
            return JSONResponse(OK)
        if act == "garbage":
            return Response(b"<html>proxy error", media_type="text/html")
        if isinstance(act, tuple):
            await asyncio.sleep(act[1])
            return JSONResponse(OK)
        headers = {"Retry-After": "0.3"} if act == 429 else {}
        return JSONResponse({"error": {"message": f"scripted {act}"}}, status_code=act, headers=headers)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]), seen


def client(url, **kw):
    kw = {"max_retries": 3, "backoff": 0.01, "timeout": 5, **kw}
    return OpenAILanguageModel(url, "m", **kw)


def test_server_down_is_retried_then_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # nothing listens once the socket closes
    t0 = time.monotonic()
    with client(f"http://127.0.0.1:{port}/v1", max_retries=2) as c:
        with pytest.raises(EndpointError) as e:
            c.generate(["a"], max_new_tokens=2)
    msg = str(e.value)
    assert f"127.0.0.1:{port}/v1/completions" in msg and "'m'" in msg and "is the server running" in msg
    assert "3 attempts" in msg and time.monotonic() - t0 < 10


def test_500_then_success():
    app, seen = scripted([500, "ok"])
    with running(app) as url, client(url) as c:
        assert c.generate(["a"], max_new_tokens=2)[0].text == " hi"
    assert len(seen) == 2 and seen[0][1]["prompt"] == ["a"] and seen[0][1]["model"] == "m"


def test_429_backs_off_as_told_and_gives_up_with_the_fix():
    app, seen = scripted([429, 429, "ok"])
    with running(app) as url, client(url) as c:
        assert c.generate(["a"], max_new_tokens=2)[0].logprob == -0.5
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:])]
    assert len(seen) == 3 and all(g >= 0.28 for g in gaps), "Retry-After: 0.3 is honoured"
    app, seen = scripted([429])
    with running(app) as url, client(url, max_retries=2, max_backoff=0.05) as c:
        with pytest.raises(EndpointError, match=r"HTTP 429: scripted 429; lower \"concurrency\""):
            c.generate(["a"], max_new_tokens=2)
    assert len(seen) == 3


def test_malformed_json_and_missing_logprobs_are_not_retried():
    app, seen = scripted(["garbage"])
    with running(app) as url, client(url) as c:
        with pytest.raises(EndpointError, match="not JSON.*/v1 root"):
            c.generate(["a"], max_new_tokens=2)
    assert len(seen) == 1
    app, seen = scripted([400])
    with running(app) as url, client(url) as c:
        with pytest.raises(EndpointError, match="HTTP 400: scripted 400"):
            c.generate(["a"], max_new_tokens=2)
    assert len(seen) == 1


def test_timeout_is_retried_then_named():
    app, seen = scripted([("sleep", 1.0), "ok"])
    with running(app) as url, client(url, timeout=0.3) as c:
        assert c.generate(["a"], max_new_tokens=2)[0].num_tokens == 1
    app, seen = scripted([("sleep", 1.0)])
    with running(app) as url, client(url, timeout=0.2, max_retries=1) as c:
        with pytest.raises(EndpointError, match="no answer within 0.2 s.*raise \"timeout\""):
            c.generate(["a"], max_new_tokens=2)
    assert len(seen) == 2


def test_one_request_per_batch_with_the_settings():
    app, seen = scripted(["ok"])
    with running(app) as url, client(url, batch_size=1, concurrency=2) as c:
        gens = c.generate(["a", "b", "c"], max_new_tokens=2, stop=["\n"], seed=3, temperature=0.5)
    assert [g.text for g in gens] == [" hi"] * 3
    assert sorted(b["prompt"][0] for _, b in seen) == ["a", "b", "c"]
    assert all(b["stop"] == ["\n"] and b["seed"] == 3 and b["temperature"] == 0.5 for _, b in seen)


# ----------------------------------------------------------------------------- config

def base_cfg(**backends):
    return {"name": "t", "backends": backends}


def test_openai_backend_config_and_refusal_as_ensemble_member(tmp_path):
    served = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "MY_KEY"}
    cfg = parse_config(base_cfg(served=served))
    assert cfg.backends["served"].concurrency == 8 and config_to_dict(cfg)["backends"]["served"]["api_key_env"] == "MY_KEY"
    from dln_ens.backends import describe_backend
    assert describe_backend(cfg, "served") == {"backend": "served", "type": "openai",
                                                "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    with pytest.raises(ConfigError, match=r"backends.ens.members\[1\].*'served' is an 'openai' backend.*full "
                                          r"next-token distribution"):
        parse_config(base_cfg(served=served, local={"type": "class", "class": "x:Y"},
                              ens={"type": "ensemble", "members": ["local", "served"], "main": "local",
                                   "matrices": "m"}))
    for bad, key in ((dict(served, base_url="127.0.0.1:8000"), "base_url"),
                     (dict(served, api_key_env="sk-abc123"), "api_key_env"),
                     (dict(served, concurrency=0), "concurrency"),
                     (dict(served, tokenizer=str(tmp_path / "none")), "tokenizer")):
        with pytest.raises(ConfigError, match=f"backends.served.{key}"):
            parse_config(base_cfg(served=bad))


def test_missing_key_variable_is_named_without_a_value(monkeypatch):
    from dln_ens.backends import BackendPool

    monkeypatch.delenv("DLN_ENS_TEST_NO_SUCH_KEY", raising=False)
    cfg = parse_config(base_cfg(served={"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                        "api_key_env": "DLN_ENS_TEST_NO_SUCH_KEY"}))
    with pytest.raises(ConfigError, match="backend 'served': the environment variable DLN_ENS_TEST_NO_SUCH_KEY"):
        BackendPool(cfg)
    with pytest.raises(EndpointError, match="DLN_ENS_TEST_NO_SUCH_KEY.*not set"):
        OpenAILanguageModel("http://127.0.0.1:9/v1", "m", api_key_env="DLN_ENS_TEST_NO_SUCH_KEY")


# ----------------------------------------------------------------------------- DLN

def test_dln1_on_the_served_model_learns_the_in_process_prompts(tiny_gpt2_dir, tmp_path, monkeypatch):
    from dln_ens.backends import BackendPool
    from dln_ens.data.registry import register_task
    from dln_ens.data.task import Example, Task
    from dln_ens.dln.run import run_dln
    from dln_ens.lm.hf import HFLanguageModel
    from dln_ens.serve.app import create_app
    from dln_ens.serve.engine import Engine

    @register_task("test/served_toy")
    def _task() -> Task:
        ex = [Example(f"the {w} cat", "Yes" if i % 2 else "No") for i, w in enumerate(
            "red blue green dog one two three four".split())]
        return Task("test/served_toy", "Answer yes or no.", ex[:4], ex[4:6], ex[6:], classes=["Yes", "No"])

    key = "k3y-" + "x" * 20
    monkeypatch.setenv("DLN_ENS_TEST_KEY", key)
    served = HFLanguageModel.from_pretrained(tiny_gpt2_dir, name="gpt2")
    with running(create_app(Engine(served), api_key=key)) as url:
        cfg = parse_config({
            "name": "served", "runs_dir": str(tmp_path),
            "backends": {"local": {"type": "hf", "path": str(tiny_gpt2_dir)},
                         "client": {"type": "openai", "base_url": url, "model": "gpt2",
                                    "api_key_env": "DLN_ENS_TEST_KEY", "max_retries": 0}},
            "dln": {"task": "test/served_toy", "iters": 2, "batch_size": 4, "num_p_samples": 2, "num_h_samples": 1,
                    "num_dev": None, "num_test": None, "memory_size": 1, "proposal_max_new_tokens": 8,
                    "output_max_new_tokens": 4, "proposal_template": "q_action_prompt:v1-short",
                    "proposal_max_examples": 1,
                    "systems": [{"name": "inproc", "layers": 1, "backend": "local"},
                                {"name": "client", "layers": 1, "backend": "client"}]}})
        res = run_dln(cfg, BackendPool(cfg), tmp_path / "run")
    logs = {s: [json.loads(x) for x in (tmp_path / "run" / f"dln_{s}.jsonl").read_text().splitlines()]
            for s in ("inproc", "client")}
    prompts = {s: [r["prompts"] for r in rows] for s, rows in logs.items()}
    assert prompts["client"] == prompts["inproc"]
    assert len({json.dumps(p) for p in prompts["inproc"]}) > 1, "the prompt was updated at least once"
    assert res["systems"]["client"]["best_prompts"] == res["systems"]["inproc"]["best_prompts"]
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace"), f"the API key leaked into {path}"


# ----------------------------------------------------------------------------- echo offsets

def test_target_span_reads_vllm_style_echoes():
    """vLLM's offsets count the token strings ("<s>" included) and SentencePiece shows a leading
    space: the prompt is located in the joined tokens before the boundary is applied."""
    from dln_ens.lm.echo import target_span

    tokens = ["<s>", " The", " cat", " sat", " down"]
    offsets = [0, 3, 7, 11, 15]
    assert target_span(tokens, offsets, "The cat", " sat down") == (3, 5)
    assert target_span(tokens, offsets, "The cat ", "sat down") == (3, 5)        # rule 2: space moves
    assert target_span(tokens, offsets, "The c", "at sat down") == (2, 5)        # rule 3: straddling token
    assert target_span(tokens + ["!"], offsets + [20], "The cat", " sat down", generated=1) == (3, 5)
    # a character split over three byte tokens belongs to the first; the others have no text
    tokens, offsets = ["go", " ", "→", "", "", " left"], [0, 2, 3, 4, 4, 4]
    assert target_span(tokens, offsets, "go ", "→ left") == (2, 6)
    assert target_span(tokens, offsets, "go →", " left") == (5, 6)
