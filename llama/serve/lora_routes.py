"""The server's LoRA adapters (llama/engine/lora_slots.py): their model cards, and the dynamic load and unload
endpoints in vLLM's shape, off unless the server was started with --enable_lora_loading.

    POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "/adapters/sql"}
    POST /v1/unload_lora_adapter  {"lora_name": "sql"}

Both sit behind the API key. A loaded adapter is read and checked at once (a bad one is a 400 naming the file and
module) and goes into a bank slot when a request first names it; an adapter in use by a running request cannot
be unloaded (400).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .protocol import APIError, parse_json


def _slots(engine):
    return getattr(engine.generator.model, "lora_slots", None)


def cards(engine, model: str, created: int) -> List[Dict[str, Any]]:
    """One model card per adapter, its `parent` the base (as vLLM lists them)."""
    slots = _slots(engine)
    if slots is None:
        return []
    return [{"id": name, "object": "model", "created": created, "owned_by": "llama", "root": path,
             "parent": model, "max_seq_len": engine.max_seq_len} for name, path in list(slots.paths.items())]


def mount(app: FastAPI, engine, model: str, authorize: Callable, read_body: Callable, enabled: bool) -> None:
    """Add the load/unload routes (404 when not `enabled`, after the API key check)."""

    async def body_of(request: HTTPRequest) -> Dict[str, Any]:
        await authorize(request)
        if not enabled:
            raise APIError(404, "loading LoRA adapters at run time is off: start the server with "
                                "--enable_lora_loading", code="not_found")
        if _slots(engine) is None:
            raise APIError(400, "this server has no LoRA banks: start it with --lora name=PATH or --max_lora_rank",
                           code="unsupported")
        body = parse_json(await read_body(request))
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "'lora_name' must be a non-empty string", param="lora_name")
        if name == model:
            raise APIError(400, f"'lora_name' {name!r} is the base model's name", param="lora_name")
        return body

    def guarded(work: Callable[[], None]) -> None:
        try:
            engine.exclusive(work)
        except (ValueError, FileNotFoundError) as err:
            raise APIError(400, str(err)[:800]) from None

    @app.post("/v1/load_lora_adapter")
    async def load(request: HTTPRequest) -> PlainTextResponse:
        body = await body_of(request)
        name, path = body["lora_name"], body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise APIError(400, "'lora_path' must be the adapter's folder", param="lora_path")
        slots = _slots(engine)
        if name in slots.paths:
            raise APIError(400, f"the LoRA adapter {name!r} is already loaded", param="lora_name")
        await run_in_threadpool(guarded, lambda: slots.register(name, path))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: HTTPRequest) -> PlainTextResponse:
        body = await body_of(request)
        name = body["lora_name"]
        slots = _slots(engine)
        if name not in slots.paths:
            raise APIError(404, f"the LoRA adapter {name!r} is not loaded", param="lora_name",
                           code="model_not_found")
        await run_in_threadpool(guarded, lambda: slots.unregister(name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
