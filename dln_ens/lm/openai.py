"""`OpenAILanguageModel`: the LanguageModel protocol over an OpenAI-compatible ``/v1/completions``
endpoint (vLLM, SGLang, llama.cpp server, OpenAI, `dln-ens serve`), with httpx.

- ``generate``: the prompts in batches of ``batch_size`` per request; ``Generation.logprob`` sums
  the returned ``token_logprobs`` (``logprobs: 0``, the chosen tokens only).
- ``score``: ``context + target`` echoed with ``logprobs`` and ``max_tokens = echo_max_tokens``
  (0; set 1 for servers that must generate a token, which is then ignored); the target's tokens
  are found by character offsets with `HFLanguageModel.split_pairs`' boundary rule (`lm.echo`).
  With a local ``tokenizer`` (the served model's), prompts go as token ids split exactly as
  `split_pairs` does, so the result is the in-process ``score`` of that model.
- ``next_token_logprobs``: exact, each form of a candidate (" cand", "cand", per alternative
  "a|A") scored as a target and the first target token's log-prob read (never looked up in a
  top-k list); combined by ``aggregate`` as `lm.candidates` says. Without a ``tokenizer``, two
  forms start with the same token when their echoed first tokens have the same text.

At most ``concurrency`` requests are in flight. 429, 5xx, timeouts and refused connections are
retried ``max_retries`` times with exponential backoff (``backoff`` * 2^attempt seconds, capped
at ``max_backoff``; a 429's Retry-After is honoured up to the cap). Every failure raises
`EndpointError` naming the URL, the model and what to do. The API key is read from the
environment variable named by ``api_key_env`` and only ever sent in the Authorization header.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import httpx
import numpy as np

from dln_ens.errors import UserError
from dln_ens.lm.base import Generation, Score
from dln_ens.lm.batching import chunks
from dln_ens.lm.echo import EchoError, span_logprobs, target_span
from dln_ens.lm.stopping import cut_at_stop


class EndpointError(UserError, RuntimeError):
    """A completions endpoint failed or answered something unusable; the message names the URL,
    the model and the fix."""


class OpenAILanguageModel:
    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, tokenizer: str | None = None,
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5, batch_size: int = 8,
                 backoff: float = 0.5, max_backoff: float = 30.0, echo_max_tokens: int = 0,
                 name: str | None = None, transport: httpx.BaseTransport | None = None):
        if concurrency < 1 or batch_size < 1 or max_retries < 0 or timeout <= 0 or echo_max_tokens not in (0, 1):
            raise ValueError("concurrency and batch_size must be >= 1, max_retries >= 0, timeout > 0, "
                             "echo_max_tokens 0 or 1")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.name = name or model
        self.url = f"{self.base_url}/completions"
        self.concurrency, self.batch_size, self.max_retries = concurrency, batch_size, max_retries
        self.timeout, self.backoff, self.max_backoff = timeout, backoff, max_backoff
        self.echo_max_tokens = echo_max_tokens
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EndpointError(f"{self._who()}: the environment variable {api_key_env} (api_key_env) is not "
                                    f"set; export it with the server's key, or drop api_key_env for a server "
                                    f"without authentication")
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(headers=headers, timeout=timeout, transport=transport,
                                  limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="openai-lm")
        self.tokens = None
        if tokenizer is not None:
            from dln_ens.lm.tokens import LocalTokenizer
            self.tokens = LocalTokenizer(tokenizer)

    def __repr__(self) -> str:  # never the key
        return f"OpenAILanguageModel(name={self.name!r}, url={self.url!r}, model={self.model!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- HTTP -------------------------------------------------------------------------------

    def _who(self) -> str:
        return f"{self.url} (model {self.model!r})"

    def _delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        delay = self.backoff * 2 ** attempt
        after = response.headers.get("retry-after") if response is not None else None
        if after is not None:
            try:
                delay = max(delay, float(after))
            except ValueError:
                pass
        return min(delay, self.max_backoff)

    def post(self, payload: dict) -> dict:
        """One completions request with retries; the decoded JSON body."""
        problem = ""
        for attempt in range(self.max_retries + 1):
            try:
                r = self._http.post(self.url, json=payload)
            except httpx.TimeoutException:
                problem = (f"no answer within {self.timeout:g} s (timeout); raise \"timeout\" or lower "
                           f"\"batch_size\" / \"concurrency\"")
                wait = self._delay(attempt)
            except httpx.TransportError as e:
                problem = (f"cannot connect ({type(e).__name__}: {e}); is the server running at "
                           f"{self.base_url}? (e.g. `vllm serve ...` or `dln-ens serve --conf FILE --backend NAME`)")
                wait = self._delay(attempt)
            else:
                if r.status_code == 429 or r.status_code >= 500:
                    hint = "lower \"concurrency\"" if r.status_code == 429 else "see the server's log"
                    problem = f"HTTP {r.status_code}: {_server_message(r)}; {hint}"
                    wait = self._delay(attempt, r)
                elif r.status_code >= 400:
                    raise EndpointError(f"{self._who()} refused the request: HTTP {r.status_code}: "
                                        f"{_server_message(r)}; {_fix_for(r.status_code)}")
                else:
                    try:
                        return r.json()
                    except ValueError:
                        raise EndpointError(f"{self._who()} answered with a body that is not JSON "
                                            f"({r.text[:80]!r}); is base_url the /v1 root of an "
                                            f"OpenAI-compatible server?") from None
            if attempt < self.max_retries:
                time.sleep(wait)
        raise EndpointError(f"{self._who()}: {problem} (gave up after {self.max_retries + 1} attempts)")

    def complete(self, prompts: Sequence, body: dict) -> list[dict]:
        """``choices`` for each prompt (a string or token ids), ``batch_size`` prompts per request,
        ``concurrency`` requests in flight."""
        batches = list(chunks(list(prompts), self.batch_size))
        payloads = [{"model": self.model, "prompt": b, **body} for b in batches]
        out = []
        for batch, data in zip(batches, self._pool.map(self.post, payloads)):
            choices = data.get("choices") if isinstance(data, dict) else None
            if not isinstance(choices, list) or len(choices) != len(batch):
                raise EndpointError(f"{self._who()} answered {len(batch)} prompts with "
                                    f"{len(choices) if isinstance(choices, list) else 'no'} choices; "
                                    f"is it an OpenAI-compatible completions endpoint?")
            out += sorted(choices, key=lambda c: c.get("index", 0))
        return out

    def _logprobs(self, choice: dict) -> dict:
        lp = choice.get("logprobs")
        if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
            raise EndpointError(f"{self._who()} returned no logprobs; use a server and model that return "
                                f"them for completions (vLLM, `dln-ens serve`, llama.cpp's /v1 with n_probs)")
        return lp

    # ---- the protocol -----------------------------------------------------------------------

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[Generation]:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens <= 0 or not prompts:
            return [Generation("", 0.0, 0) for _ in prompts]
        body = {"max_tokens": max_new_tokens, "temperature": temperature, "logprobs": 0}
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        out = []
        for choice in self.complete(prompts, body):
            lps = self._logprobs(choice)["token_logprobs"]
            out.append(Generation(text=cut_at_stop(choice.get("text") or "", stop),
                                  logprob=float(sum(lps)), num_tokens=len(lps)))
        return out

    def target_logprobs(self, contexts: list[str], targets: list[str]) -> list[list[float]]:
        """Per pair, the log-prob of each of the target's tokens (see the module docstring)."""
        return [lps for _, lps in self._echo_targets(contexts, targets)]

    def _echo_targets(self, contexts: list[str], targets: list[str]) -> list[tuple[str | None, list[float]]]:
        """Per pair, the echoed text of the target's first token (None for an empty target or
        when the server returns no token texts) and the log-prob of each of its tokens."""
        if len(contexts) != len(targets):
            raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
        body = {"max_tokens": self.echo_max_tokens, "echo": True, "logprobs": 1, "temperature": 0.0}
        if self.tokens is not None:
            pairs = self.tokens.split_pairs(contexts, targets)
            todo = [i for i, (_, t) in enumerate(pairs) if t]
            choices = self.complete([pairs[i][0] + pairs[i][1] for i in todo], body)
            spans = [(len(pairs[i][0]), len(pairs[i][0]) + len(pairs[i][1])) for i in todo]
        else:
            todo = [i for i, t in enumerate(targets) if t]
            choices = self.complete([contexts[i] + targets[i] for i in todo], body)
        out = [(None, []) for _ in contexts]
        for k, (i, choice) in enumerate(zip(todo, choices)):
            lp = self._logprobs(choice)
            try:
                if self.tokens is None:
                    spans_k = target_span(lp.get("tokens") or [], lp.get("text_offset") or [], contexts[i], targets[i],
                                          self.echo_max_tokens)
                else:
                    spans_k = spans[k]
                texts = lp.get("tokens") or []
                out[i] = (texts[spans_k[0]] if spans_k[0] < len(texts) else None,
                          span_logprobs(lp["token_logprobs"], *spans_k))
            except EchoError as e:
                raise EndpointError(f"{self._who()}: cannot read the echoed log-probs of context "
                                    f"{contexts[i][-40:]!r} + target {targets[i][:40]!r}: {e}. Set \"tokenizer\" "
                                    f"to the served model's tokenizer directory to send token ids") from None
        return out

    def score(self, contexts: list[str], targets: list[str]) -> list[Score]:
        return [Score(float(sum(lps)), len(lps)) for lps in self.target_logprobs(contexts, targets)]

    def next_token_logprobs(self, contexts: list[str], candidates: list[str], *,
                            aggregate: str = "max") -> np.ndarray:
        from dln_ens.lm.candidates import aggregate_forms, check_candidates, form_first_tokens, forms_of
        check_candidates(candidates, aggregate)
        forms, spans = forms_of(candidates)
        shape = (len(contexts), len(forms))
        if self.tokens is None:   # tokens told apart by their echoed text
            reads = self._echo_targets([c for c in contexts for _ in forms], forms * len(contexts))
            keys = [[reads[i * len(forms) + j][0] for j in range(len(forms))] for i in range(len(contexts))]
            lps = np.array([x[1][0] for x in reads], dtype=np.float64).reshape(shape)
            return aggregate_forms(keys, lps, spans, aggregate)
        first = form_first_tokens(self.tokens, contexts, forms).tolist()
        ctxs = [self.tokens.nonempty(ids) for ids in self.tokens.encode_many(contexts)]
        prompts = [ctx + [tok] for ctx, row in zip(ctxs, first) for tok in row]
        body = {"max_tokens": self.echo_max_tokens, "echo": True, "logprobs": 1, "temperature": 0.0}
        choices = self.complete(prompts, body)
        lps = [self._logprobs(ch)["token_logprobs"][len(p) - 1] for p, ch in zip(prompts, choices)]
        return aggregate_forms(first, np.array(lps, dtype=np.float64).reshape(shape), spans, aggregate)


def _server_message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:300]
    except (ValueError, AttributeError):
        pass
    return (r.text or r.reason_phrase or "")[:300]


def _fix_for(status: int) -> str:
    if status in (401, 403):
        return "set \"api_key_env\" to the environment variable holding the server's key"
    if status == 404:
        return "check \"base_url\" (the server's /v1 root) and \"model\" (GET <base_url>/models lists them)"
    return "check the request settings against the server's documentation"
