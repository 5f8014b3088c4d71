"""The HTTP app: OpenAI-compatible endpoints over the engine, on FastAPI (Starlette) and served by uvicorn.

    GET  /health                 liveness and load: 200 while serving, 503 while draining or after a failure
                                 (HEAD too)
    GET  /v1/models              the one model served
    POST /v1/completions         text completion; "stream": true answers as server-sent events
    POST /v1/chat/completions    chat completion in the model family's chat format, streamed likewise
    POST /tokenize, /detokenize, GET /tokenizer_info   the tokenizer, in vLLM's shapes (tokenize.py)
    GET  /metrics                Prometheus metrics (metrics.py); every answer carries an X-Request-ID

Requests reach the engine thread through `Scheduler.submit`; its events come back onto the event loop with
`loop.call_soon_threadsafe` into an asyncio queue per request. A client that disconnects, streaming or not,
cancels its request, which frees its row at the next step boundary. Every error is OpenAI's error JSON:
400 bad parameters or JSON, 401 a missing or wrong API key (answered after AUTH_DELAY, so keys cannot be
guessed fast), 404 an unknown model or route, 408 a body that does not arrive within body_timeout, 413 a body
over the cap, 415 a body that is not application/json, 429 (with Retry-After) when every row is busy and the
queue is full, 503 while draining. Host and Origin are checked first (security.py).

Parsing the body and tokenizing the prompt (a megabyte of text takes a while) run in a worker thread, never
on the event loop, so they do not pause the other streams; turning tokens into text happens on the engine
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterable, List, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import lora_routes
from .connections import quiet_accept_errors
from .metrics import Metrics, RequestID, optional_metrics
from .limits import AUTH_DELAY, BODY_TIMEOUT, MAX_BODY_BYTES

from .protocol import (APIError, ChunkWriter, Job, chat_job, completion_jobs, grammar_failure, merged, parse_json,
                       prompt_entries, response)
from ..engine import Chunk, Event, Finished, Request, TokenLogprob
from .scheduler import QueueFull, Scheduler, Unavailable
from .security import HostOriginGuard
from .tokenize import detokenize, tokenize, tokenizer_info

log = logging.getLogger("llama.serve")



class EventStream:
    """One request's engine events, as an async iterator on the event loop."""

    def __init__(self, engine: Scheduler, job: Job, metrics: Optional[Metrics] = None, rid: str = "") -> None:
        """rid: the HTTP request's X-Request-ID, which the engine's log lines about this request then name."""
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: "asyncio.Queue[Event]" = asyncio.Queue()
        sink = self._sink if metrics is None else metrics.watch(self._sink)
        self.request = Request(job.prompt, job.params, sink, id=f"{rid}/{job.index}" if rid else job.id,
                               continues_prompt=job.continues_prompt, lora=job.lora)

    def _sink(self, event: Event) -> None:  # the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def submit(self) -> None:
        self.engine.submit(self.request)

    def cancel(self) -> None:
        self.engine.cancel(self.request)

    async def __aiter__(self) -> AsyncIterator[Event]:
        """The request's events until every one of its choices has finished."""
        left = self.request.params.n
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, Finished):
                left -= 1
                if left == 0:
                    return


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client has gone (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(engine: Scheduler, model: str, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
               retry_after: int = 1, body_timeout: float = BODY_TIMEOUT, auth_delay: float = AUTH_DELAY,
               allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
               shield: Optional[Any] = None, metrics: bool = True, lora_loading: bool = False) -> FastAPI:
    """The ASGI app serving `engine` under the model id `model`. api_key: required as a bearer token on /v1/*
    (compared in constant time; an empty key is a ValueError, not "no key"). Bodies over max_body_bytes are
    refused with 413 before they are read whole. allowed_hosts / allowed_origins widen the Host and Origin
    checks (security.py; "*" allows any). shield: a Llama Guard `Llama` (see `Shield`) that checks chat messages
    and whole chat answers. lora_loading: serve /v1/load_lora_adapter and /v1/unload_lora_adapter
    (lora_routes.py)."""
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
    app.add_middleware(HostOriginGuard, allowed_hosts=list(allowed_hosts), allowed_origins=list(allowed_origins),
                       max_body_bytes=max_body_bytes)
    meter = optional_metrics(engine.stats, getattr(engine, "prefix_cache_stats", None)) if metrics else None
    app.add_middleware(RequestID, metrics=meter)  # outermost: refused requests get an ID and a count too
    guard = Shield(shield) if shield is not None else None
    key = api_key.encode() if api_key else None
    created = int(time.time())

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

    async def authorize(request: HTTPRequest) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)):
            await asyncio.sleep(auth_delay)  # slows a guesser down without holding up anyone else
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: HTTPRequest) -> bytes:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(415, f"the request body must be application/json, got "
                                f"{media[:100] or 'no Content-Type'!r}: send 'Content-Type: application/json'",
                           code="unsupported_media_type")
        too_big = APIError(413, f"the request body exceeds {max_body_bytes} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > max_body_bytes):
            raise too_big
        body = bytearray()

        async def read() -> None:
            async for part in request.stream():
                body.extend(part)
                if len(body) > max_body_bytes:
                    raise too_big

        try:
            await asyncio.wait_for(read(), body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {body_timeout:g} s",
                           code="request_timeout") from None
        return bytes(body)

    def available() -> None:
        if engine.failure is not None or engine.draining:
            raise APIError(503, engine.failure or "the server is shutting down", code="unavailable",
                           headers={"Retry-After": str(retry_after)})

    def model_card() -> Dict[str, Any]:
        return {"id": model, "object": "model", "created": created, "owned_by": "llama",
                "max_seq_len": engine.max_seq_len, "chat_format": engine.generator.prompts.describe()}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        status = "failed" if engine.failure is not None else "draining" if engine.draining else "ok"
        return JSONResponse({"status": status, **engine.stats(), "finished": dict(engine.finished)},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics_route(request: HTTPRequest) -> Response:
        await authorize(request)
        if meter is None:
            raise APIError(404, "metrics are off" if not metrics else
                           "metrics need prometheus-client: pip install 'llama[metrics]'", code="not_found")
        return Response(meter.text(), media_type=meter.content_type)

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> Dict[str, Any]:
        await authorize(request)
        return {"object": "list", "data": [model_card()] + lora_routes.cards(engine, model, created)}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: HTTPRequest) -> Dict[str, Any]:
        await authorize(request)
        if name == model:
            return model_card()
        for card in lora_routes.cards(engine, model, created):
            if card["id"] == name:
                return card
        raise APIError(404, f"the model {name!r} does not exist; this server serves {model!r}"[:400],
                       param="model", code="model_not_found")

    lora_routes.mount(app, engine, model, authorize, read_body, lora_loading)

    async def complete(request: HTTPRequest, make_job: Callable[..., Job]):
        await authorize(request)
        available()
        raw = await read_body(request)
        made = await run_in_threadpool(lambda: make_job(parse_json(raw), engine.generator, model))  # off the loop
        jobs = made if isinstance(made, list) else [made]
        job = jobs[0]
        if guard is not None and job.dialog is not None:
            await guard.check(job.dialog, "the messages")
        rid = request.scope.get("state", {}).get("request_id", "")
        streams = [EventStream(engine, j, meter, rid) for j in jobs]
        try:
            for stream in streams:
                stream.submit()
        except (QueueFull, Unavailable, ValueError) as err:
            for stream in streams:  # a list of prompts runs whole or not at all
                stream.cancel()
            if isinstance(err, QueueFull):
                raise APIError(429, f"the server is busy ({err}); retry after {retry_after} s", code="queue_full",
                               type="rate_limit_error", headers={"Retry-After": str(retry_after)}) from None
            if isinstance(err, Unavailable):
                raise APIError(503, str(err), code="unavailable",
                               headers={"Retry-After": str(retry_after)}) from None
            raise APIError(400, str(err), param=getattr(err, "param", None)) from None
        if job.stream:
            return StreamingResponse(_sse(request, streams[0], job, engine.generator.tokenizer),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if len(jobs) > 1:
            try:
                answers = await asyncio.gather(*[_whole(request, s, j, engine.generator.tokenizer)
                                                 for s, j in zip(streams, jobs)])
            finally:
                for stream in streams:
                    stream.cancel()
            return JSONResponse(merged([json.loads(a.body) for a in answers]))
        answer = await _whole(request, streams[0], job, engine.generator.tokenizer)
        if guard is not None and job.dialog is not None and answer.status_code == 200:
            body = json.loads(answer.body)
            message = body["choices"][0]["message"]
            content = message["content"] if message["content"] is not None else json.dumps(message["tool_calls"])
            await guard.check(job.dialog + [{"role": "assistant", "content": content}], "the answer")
        return answer

    async def tokenizer_route(request: HTTPRequest, work: Callable[..., Dict[str, Any]]) -> Dict[str, Any]:
        await authorize(request)
        raw = await read_body(request)
        return await run_in_threadpool(lambda: work(parse_json(raw), engine.generator))

    @app.post("/tokenize")
    async def tokenize_route(request: HTTPRequest) -> Dict[str, Any]:
        return await tokenizer_route(request, tokenize)

    @app.post("/detokenize")
    async def detokenize_route(request: HTTPRequest) -> Dict[str, Any]:
        return await tokenizer_route(request, detokenize)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: HTTPRequest) -> Dict[str, Any]:
        await authorize(request)
        return tokenizer_info(engine.generator)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await complete(request, completion_jobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await complete(request, chat_job)

    return app


class Shield:
    """--shield: a Llama Guard model rating chat messages before they run and whole (non-streamed) answers after;
    an unsafe rating is answered with 400 and code 'content_filter'. One rating at a time, off the event loop.
    A streamed answer reaches its client as it is written: only its messages are checked."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.lock = threading.Lock()

    def _rate(self, dialog: List[Dict[str, str]]):
        with self.lock:
            return self.guard.moderate([m for m in dialog if m["role"] in ("user", "assistant") and
                                        isinstance(m.get("content"), str)])

    async def check(self, dialog: List[Dict[str, str]], what: str) -> None:
        try:
            verdict = await asyncio.to_thread(self._rate, dialog)
        except ValueError as err:  # too long for the shield's context, say
            raise APIError(400, f"the shield cannot rate {what}: {err}", code="content_filter") from None
        if not verdict.safe:
            raise APIError(400, f"refused: the shield rates {what} {verdict.describe()}", code="content_filter")


def _watch(request: HTTPRequest, stream: EventStream) -> "asyncio.Future[None]":
    """A task that cancels the request when its client disconnects: the engine then ends the events with
    Finished('cancelled') and frees the row at the next step boundary."""
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda task: None if task.cancelled() else stream.cancel())
    return watcher


async def _whole(request: HTTPRequest, stream: EventStream, job: Job, tokenizer: Any) -> JSONResponse:
    """Collect the answer, every choice of it (a client that leaves first cancels the request)."""
    n = job.params.n
    texts: List[List[str]] = [[] for _ in range(n)]
    entries: List[List[TokenLogprob]] = [[] for _ in range(n)]
    finished: List[Optional[Finished]] = [None] * n
    prompt: List[TokenLogprob] = []
    watcher = _watch(request, stream)
    try:
        async for event in stream:
            if isinstance(event, Chunk):
                texts[event.index].append(event.text)
                entries[event.index] += event.logprobs
                if event.prompt_logprobs is not None:
                    prompt = prompt_entries(tokenizer, job, event.prompt_logprobs, event.prompt_top)
            elif event.reason == "error":
                raise grammar_failure(job, event) or \
                    APIError(500, event.message, type="server_error", code="engine_failed")
            elif event.reason == "abort":
                raise APIError(503, event.message, code="shutdown")
            elif event.reason == "cancelled":
                break
            else:
                finished[event.index] = event
                if all(f is not None for f in finished):
                    return JSONResponse(response(job, ["".join(t) for t in texts], entries, finished, prompt))
    finally:
        watcher.cancel()
        stream.cancel()  # a no-op once the request has finished
    return JSONResponse({}, status_code=499)  # the client has gone: nobody reads this


async def _sse(request: HTTPRequest, stream: EventStream, job: Job, tokenizer: Any) -> AsyncIterator[str]:
    """The answer as server-sent events, choices interleaved by index (a client that leaves cancels the
    request)."""
    writer = ChunkWriter(job)
    watcher = _watch(request, stream)
    finished: List[Finished] = []
    try:
        for line in writer.start():
            yield line
        async for event in stream:
            if isinstance(event, Chunk):
                if event.prompt_logprobs is not None and job.echo:
                    for line in writer.echo(prompt_entries(tokenizer, job, event.prompt_logprobs, event.prompt_top)):
                        yield line
                if event.text or event.logprobs or event.prompt_logprobs is None:
                    yield writer.chunk(event.text, event.logprobs, event.index)
            elif event.reason == "error":
                for line in writer.error(event):
                    yield line
                return
            elif event.reason != "cancelled":
                finished.append(event)
                yield writer.finish_choice(event)
                if len(finished) == job.params.n:
                    for line in writer.end(finished):
                        yield line
    finally:
        watcher.cancel()
        stream.cancel()
