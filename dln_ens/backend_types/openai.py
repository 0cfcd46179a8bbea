"""``openai``: a model behind an OpenAI-compatible /v1/completions endpoint (`OpenAILanguageModel`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from dln_ens.backend_types.base import BackendType, CheckContext
from dln_ens.confparse import ConfigError, above, at_least


@dataclass
class OpenAIBackend:
    type: Literal["openai"]
    base_url: str                    # e.g. "http://127.0.0.1:8000/v1"
    model: str                       # the served model's name (GET <base_url>/models)
    api_key_env: Union[str, None] = None    # name of the environment variable holding the key
    tokenizer: Union[str, None] = None      # the served model's local tokenizer: exact score boundaries
    concurrency: int = field(default=8, metadata=at_least(1))      # requests in flight
    timeout: float = field(default=60.0, metadata=above(0))        # seconds per request
    max_retries: int = field(default=5, metadata=at_least(0))      # on 429, 5xx, timeouts, refused connections
    batch_size: int = field(default=8, metadata=at_least(1))       # prompts per request
    backoff: float = field(default=0.5, metadata=at_least(0))      # first retry delay in s, doubled each retry
    echo_max_tokens: Literal[0, 1] = 0   # 1 for servers that refuse max_tokens=0 with echo


def _check(b: OpenAIBackend, name: str, ctx: CheckContext) -> None:
    where = f"backends.{name}"
    if not b.base_url.startswith(("http://", "https://")):
        raise ctx.error(f"{where}.base_url", f"{b.base_url!r} must be an http(s) URL such as \"http://127.0.0.1:8000/v1\"")
    if b.api_key_env is not None and not b.api_key_env.replace("_", "").isalnum():
        raise ctx.error(f"{where}.api_key_env", "must be the NAME of an environment variable (the key itself never "
                                                "goes in a config)")
    if b.tokenizer is not None and not Path(b.tokenizer).is_dir():
        raise ctx.error(f"{where}.tokenizer", f"{b.tokenizer} is not a directory; give the served model's local "
                                              f"tokenizer directory or null")


def _validate(b: OpenAIBackend, name: str, ctx: CheckContext) -> None:
    """Before anything loads: the key's variable is set, if one is named."""
    import os
    if b.api_key_env is not None and not os.environ.get(b.api_key_env):
        raise ConfigError(f"{ctx.source}: backend {name!r}: the environment variable {b.api_key_env} (api_key_env) "
                          f"is not set; export it with the server's key, or set \"api_key_env\": null for a server "
                          f"without one")


def _build(b: OpenAIBackend, pool, name: str):
    from dln_ens.lm.openai import OpenAILanguageModel
    return OpenAILanguageModel(b.base_url, b.model, api_key_env=b.api_key_env, tokenizer=b.tokenizer,
                               concurrency=b.concurrency, timeout=b.timeout, max_retries=b.max_retries,
                               batch_size=b.batch_size, backoff=b.backoff, echo_max_tokens=b.echo_max_tokens,
                               name=name)


TYPE = BackendType(schema=OpenAIBackend, build=_build, check=_check, validate=_validate,
                   describe=lambda b: {"base_url": b.base_url, "model": b.model},
                   not_member="a served model returns top-k log-probs, not the full next-token distribution "
                              "that ensemble fusion needs; serve the ensemble itself (`dln-ens serve`) or make "
                              "the member a local 'hf' backend")
