"""POST /v1/completions and /v1/chat/completions: a checked body (requests.py) becomes engine requests whose
events come back as one JSON answer or as server-sent events (responses.py).

Requests reach the engine thread through `Scheduler.submit`; its events come back onto the event loop with
`loop.call_soon_threadsafe` into an asyncio queue per request (EventStream). A client that disconnects,
streaming or not, cancels its request, which frees its row at the next step boundary. Parsing the body and
tokenizing the prompt (a megabyte of text takes a while) run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, List, Optional

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..engine import Chunk, Event, Finished, Request, TokenLogprob
from .errors import APIError
from .fields import parse_json
from .metrics import Metrics
from .requests import CHAT, COMPLETION, Job, Kind
from .responses import ChunkWriter, grammar_failure, merged, prompt_entries, response
from .scheduler import QueueFull, Scheduler, Unavailable
from .state import server

router = APIRouter()


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


@router.post("/v1/completions")
async def completions(request: HTTPRequest):
    return await complete(request, COMPLETION)


@router.post("/v1/chat/completions")
async def chat_completions(request: HTTPRequest):
    return await complete(request, CHAT)


async def complete(request: HTTPRequest, kind: Kind):
    """Check the body into the kind's jobs, run them (a list of prompts whole or not at all), and answer."""
    state = server(request)
    engine, guard, retry_after = state.engine, state.shield, state.retry_after
    await state.authorize(request)
    state.available()
    raw = await state.read_body(request)
    jobs = await run_in_threadpool(lambda: kind.jobs(parse_json(raw), engine.generator, state.model))  # off the loop
    job = jobs[0]
    if guard is not None and job.dialog is not None:
        await guard.check(job.dialog, "the messages")
    rid = request.scope.get("state", {}).get("request_id", "")
    streams = [EventStream(engine, j, state.meter, rid) for j in jobs]
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
