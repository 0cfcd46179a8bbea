"""`dln-ens serve`: an OpenAI-compatible server (Starlette + uvicorn) over any configured local
backend: ``GET /v1/models`` and ``POST /v1/completions`` with vLLM's response shape.

Loopback (127.0.0.1) by default. With ``api_key_env``, every request must carry
``Authorization: Bearer <the value of that variable>``; the key is never printed or logged.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import os
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dln_ens.errors import UserError
from dln_ens.serve.batcher import Batcher
from dln_ens.serve.engine import Engine
from dln_ens.serve.request import BadRequest, parse_request


def _error(e: BadRequest) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, api_key: str | None = None, max_prompts: int = 256) -> Starlette:
    """The ASGI app serving ``engine`` under the model name ``engine.name``."""
    batcher = Batcher(engine.complete, max_prompts=max_prompts)
    created = int(time.time())

    def authorised(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    def unauthorised() -> JSONResponse:
        return _error(BadRequest("missing or wrong API key: send \"Authorization: Bearer <key>\"", status=401,
                                 kind="authentication_error", code="invalid_api_key"))

    async def models(request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        return JSONResponse({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": created, "owned_by": "dln-ens"}]})

    async def completions(request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return _error(BadRequest("the request body is not valid JSON"))
        try:
            req = parse_request(body, engine.name, engine.vocab_size)
            choices = await batcher.submit(req.params, req.prompts)
        except BadRequest as e:
            return _error(e)
        except (ValueError, UserError) as e:   # e.g. a prompt longer than the model's context
            return _error(BadRequest(str(e)))
        except Exception as e:  # noqa: BLE001 - the server must answer, with the cause
            return _error(BadRequest(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error"))
        prompt_tokens = completion_tokens = 0
        for i, c in enumerate(choices):
            c["index"] = i
            prompt_tokens += c.pop("prompt_tokens", 0)
            completion_tokens += c.pop("completion_tokens", 0)
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                             "model": engine.name, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    async def not_found(request: Request, exc) -> JSONResponse:
        return _error(BadRequest(f"no route {request.method} {request.url.path}; this server has GET /v1/models "
                                 f"and POST /v1/completions", status=exc.status_code))

    app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/completions", completions, methods=["POST"])],
                    exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.engine, app.state.batcher = engine, batcher
    return app


def read_api_key(api_key_env: str | None) -> str | None:
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise UserError(f"--api-key-env {api_key_env}: the environment variable is not set; export it with the "
                        f"key clients must send, or drop --api-key-env")
    return key


def serve(cfg, backend: str, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None) -> None:
    """Load ``backend`` from ``cfg`` and serve it until interrupted."""
    import uvicorn

    from dln_ens.backends import BackendPool

    if backend not in cfg.backends:
        raise UserError(f"{cfg.source}: no backend {backend!r}; defined: {', '.join(cfg.backends)}")
    api_key = read_api_key(api_key_env)
    engine = Engine(BackendPool(cfg).get(backend))
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"dln-ens serve: listening on {host}, reachable from other machines"
              + ("" if api_key else "; anyone who can reach it can use it (set --api-key-env)"))
    print(f"dln-ens serve: model {engine.name!r} at http://{host}:{port}/v1", flush=True)
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning")
