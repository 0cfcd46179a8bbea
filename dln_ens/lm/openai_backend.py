"""The ``openai`` backend type: its config schema, config-time checks, build and description,
in one place (`config.py` and `backends.py` only register it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

MEMBER_REFUSAL = ("is an 'openai' backend: a served model returns top-k log-probs, not the full "
                  "next-token distribution that ensemble fusion needs; serve the ensemble itself "
                  "(`dln-ens serve`) or make the member a local 'hf' backend")


@dataclass
class OpenAIBackend:
    """A model behind an OpenAI-compatible /v1/completions endpoint (`OpenAILanguageModel`)."""
    type: Literal["openai"]
    base_url: str                    # e.g. "http://127.0.0.1:8000/v1"
    model: str                       # the served model's name (GET <base_url>/models)
    api_key_env: Union[str, None] = None    # name of the environment variable holding the key
    tokenizer: Union[str, None] = None      # the served model's local tokenizer: exact score boundaries
    concurrency: int = 8             # requests in flight
    timeout: float = 60.0            # seconds per request
    max_retries: int = 5             # on 429, 5xx, timeouts, refused connections
    batch_size: int = 8              # prompts per request
    backoff: float = 0.5             # first retry delay in seconds, doubled each retry
    echo_max_tokens: int = 0         # 1 for servers that refuse max_tokens=0 with echo


def check_openai_backend(b: OpenAIBackend, where: str, error) -> None:
    """Value checks before anything runs; ``error(key_path, message)`` makes the ConfigError."""
    if not b.base_url.startswith(("http://", "https://")):
        raise error(f"{where}.base_url", f"{b.base_url!r} must be an http(s) URL such as \"http://127.0.0.1:8000/v1\"")
    for key in ("concurrency", "batch_size"):
        if getattr(b, key) < 1:
            raise error(f"{where}.{key}", "must be at least 1")
    if b.max_retries < 0 or b.timeout <= 0 or b.backoff < 0:
        raise error(where, "max_retries and backoff must be >= 0 and timeout > 0")
    if b.echo_max_tokens not in (0, 1):
        raise error(f"{where}.echo_max_tokens", "must be 0 or 1")
    if b.api_key_env is not None and not b.api_key_env.replace("_", "").isalnum():
        raise error(f"{where}.api_key_env", "must be the NAME of an environment variable (the key itself never "
                                            "goes in a config)")
    if b.tokenizer is not None and not Path(b.tokenizer).is_dir():
        raise error(f"{where}.tokenizer", f"{b.tokenizer} is not a directory; give the served model's local "
                                          f"tokenizer directory or null")


def validate_openai(b: OpenAIBackend, where: str) -> None:
    """Before anything loads (`BackendPool.validate`): the key's variable is set, if one is named."""
    import os

    from dln_ens.config import ConfigError
    if b.api_key_env is not None and not os.environ.get(b.api_key_env):
        raise ConfigError(f"{where}: the environment variable {b.api_key_env} (api_key_env) is not set; export "
                          f"it with the server's key, or set \"api_key_env\": null for a server without one")


def build_openai(b: OpenAIBackend, name: str):
    from dln_ens.lm.openai import OpenAILanguageModel
    return OpenAILanguageModel(b.base_url, b.model, api_key_env=b.api_key_env, tokenizer=b.tokenizer,
                               concurrency=b.concurrency, timeout=b.timeout, max_retries=b.max_retries,
                               batch_size=b.batch_size, backoff=b.backoff, echo_max_tokens=b.echo_max_tokens,
                               name=name)


def describe_openai(b: OpenAIBackend) -> dict:
    return {"base_url": b.base_url, "model": b.model}
