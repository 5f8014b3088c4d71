"""The HTTP app: OpenAI-compatible endpoints over the engine, on FastAPI (Starlette) and served by uvicorn.

    GET  /health                 liveness and load: 200 while serving, 503 while draining or after a failure
                                 (HEAD too)                                                 health_routes.py
    GET  /metrics                Prometheus metrics (metrics.py); every answer carries an X-Request-ID
    GET  /v1/models              the model served and its LoRA adapters; their load and unload   model_routes.py
    POST /v1/completions         text completion; "stream": true answers as server-sent events
    POST /v1/chat/completions    chat completion in the model family's chat format, streamed likewise
                                                                                            completion_routes.py
    POST /tokenize, /detokenize, GET /tokenizer_info   the tokenizer, in vLLM's shapes          tokenize.py
    GET  /web                    the chat page, when mounted                                        web.py

Each route is declared once, in its router, as a plain function that reads the server's state (state.py) from
`app.state.server`; create_app builds that state and puts the routers together. Every error is OpenAI's error
JSON: 400 bad parameters or JSON, 401 a missing or wrong API key (answered after AUTH_DELAY, so keys cannot be
guessed fast), 404 an unknown model or route, 408 a body that does not arrive within body_timeout, 413 a body
over the cap, 415 a body that is not application/json, 429 (with Retry-After) when every row is busy and the
queue is full, 503 while draining. Host and Origin are checked first (security.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Iterable, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import completion_routes, health_routes, model_routes, tokenize
from .completion_routes import EventStream
from .connections import quiet_accept_errors
from .errors import APIError
from .limits import AUTH_DELAY, BODY_TIMEOUT, MAX_BODY_BYTES
from .metrics import RequestID, optional_metrics
from .scheduler import Scheduler
from .security import HostOriginGuard
from .shield import Shield
from .state import ServerState

__all__ = ["create_app", "EventStream", "Shield"]

log = logging.getLogger("llama.serve")
ROUTERS = (health_routes.router, model_routes.router, completion_routes.router, tokenize.router)


def create_app(engine: Scheduler, model: str, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
               retry_after: int = 1, body_timeout: float = BODY_TIMEOUT, auth_delay: float = AUTH_DELAY,
               allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
               shield: Optional[Any] = None, metrics: bool = True, lora_loading: bool = False) -> FastAPI:
    """The ASGI app serving `engine` under the model id `model`. api_key: required as a bearer token on /v1/*
    (compared in constant time; an empty key is a ValueError, not "no key"). Bodies over max_body_bytes are
    refused with 413 before they are read whole. allowed_hosts / allowed_origins widen the Host and Origin
    checks (security.py; "*" allows any). shield: a Llama Guard `Llama` (see `Shield`) that checks chat messages
    and whole chat answers. lora_loading: serve /v1/load_lora_adapter and /v1/unload_lora_adapter
    (model_routes.py)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a non-empty --api-key (or $LLAMA_API_KEY), or none at all "
                         "for a server without a key")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_accept_errors(asyncio.get_running_loop())
        yield

    # redirect_slashes off: Starlette would build the redirect from the Host header.
    app = FastAPI(title="Llama", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False,
                  lifespan=lifespan)
    meter = optional_metrics(engine.stats, getattr(engine, "prefix_cache_stats", None)) if metrics else None
    app.state.server = ServerState(engine, model, api_key=api_key or None, max_body_bytes=max_body_bytes,
                                   retry_after=retry_after, body_timeout=body_timeout, auth_delay=auth_delay,
                                   shield=Shield(shield) if shield is not None else None, meter=meter,
                                   metrics_on=metrics, lora_loading=lora_loading)
    app.add_middleware(HostOriginGuard, allowed_hosts=list(allowed_hosts), allowed_origins=list(allowed_origins),
                       max_body_bytes=max_body_bytes)
    app.add_middleware(RequestID, metrics=meter)  # outermost: refused requests get an ID and a count too
    _handle_errors(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _handle_errors(app: FastAPI) -> None:
    """Every error, however raised, answered as OpenAI's error JSON (an unexpected one as a logged 500)."""

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, err: APIError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else \
            str(err.detail)
        if err.status_code == 404 and request.url.path.rstrip("/") == "/web":
            message += ": this server has no chat page (start it with --web, or as python -m llama web)"
        return _error(APIError(err.status_code, message, code=code, headers=dict(err.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, err: RequestValidationError) -> JSONResponse:
        return _error(APIError(400, str(err)[:500]))

    @app.exception_handler(Exception)
    async def unexpected(request: HTTPRequest, err: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))
