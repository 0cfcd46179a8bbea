"""A ``POST /v1/completions`` body checked into a `CompletionRequest`; anything wrong or
unsupported raises `BadRequest`, answered with an OpenAI-style error body (pure, no model)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

MAX_LOGPROBS = 20
Prompt = Union[str, list]   # a string or token ids in the served (main) model's vocabulary

# accepted only at the value that changes nothing
_NEUTRAL = {"n": (1,), "best_of": (1,), "stream": (False,), "top_p": (1, 1.0), "suffix": ("",),
            "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Params:
    """The settings of one request; requests with equal Params share one backend call."""
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    temperature: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False


@dataclass
class CompletionRequest:
    prompts: list[Prompt]
    params: Params


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(ids: list, vocab_size: int) -> list[int]:
    if not ids:
        raise BadRequest("a prompt given as token ids must hold at least one id", "prompt")
    bad = next((x for x in ids if not _is_int(x) or not 0 <= x < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"token id {bad!r} is not in the served model's vocabulary [0, {vocab_size})", "prompt")
    return list(ids)


def parse_prompts(prompt: Any, vocab_size: int) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(p) for p in prompt):
            return [_token_ids(prompt, vocab_size)]
        if all(isinstance(p, list) for p in prompt):
            return [_token_ids(p, vocab_size) for p in prompt]
    raise BadRequest("\"prompt\" must be a string, a non-empty list of strings, a list of token ids or a "
                     "list of token-id lists", "prompt")


def parse_request(body: Any, model_name: str, vocab_size: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                         status=404, code="model_not_found")
    if "prompt" not in body:
        raise BadRequest("missing \"prompt\"", "prompt")
    prompts = parse_prompts(body["prompt"], vocab_size)
    for key, ok in _NEUTRAL.items():
        if body.get(key) is not None and body[key] not in ok:
            raise BadRequest(f"\"{key}\": {body[key]!r} is not supported by dln-ens serve (only {ok[0]!r})", key)

    def get(key, default, check, what):
        value = body.get(key)
        if value is None:
            return default
        if not check(value):
            raise BadRequest(f"\"{key}\" must be {what}, got {value!r}", key)
        return value

    echo = get("echo", False, lambda v: isinstance(v, bool), "true or false")
    max_tokens = get("max_tokens", 16, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    if max_tokens == 0 and not echo:
        raise BadRequest("\"max_tokens\": 0 is only allowed with \"echo\": true", "max_tokens")
    stop = get("stop", (), lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
               "a string or a list of strings")
    stop = tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)
    temperature = get("temperature", 1.0, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                      "a number >= 0")
    seed = get("seed", None, _is_int, "an integer")
    logprobs = get("logprobs", None, lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                   f"an integer between 0 and {MAX_LOGPROBS}")
    return CompletionRequest(prompts, Params(max_tokens, stop, float(temperature), seed, logprobs, echo))
