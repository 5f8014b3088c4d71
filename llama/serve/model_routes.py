"""The models a server answers to: GET /v1/models and /v1/models/{name} (the base and its LoRA adapters, as
vLLM lists them), and the run-time LoRA admin endpoints in vLLM's shape, off unless the server was started with
--enable_lora_loading (llama/checkpoints/lora_slots.py keeps the adapters).

    POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "/adapters/sql"}
    POST /v1/unload_lora_adapter  {"lora_name": "sql"}

All sit behind the API key. A loaded adapter is read and checked at once (a bad one is a 400 naming the file and
module) and goes into a bank slot when a request first names it; an adapter in use by a running request cannot
be unloaded (400).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .errors import APIError
from .fields import parse_json
from .state import ServerState, server

router = APIRouter()


def lora_cards(state: ServerState) -> List[Dict[str, Any]]:
    """One model card per adapter, its `parent` the base (as vLLM lists them)."""
    slots = state.lora_slots
    if slots is None:
        return []
    return [{"id": name, "object": "model", "created": state.created, "owned_by": "llama", "root": path,
             "parent": state.model, "max_seq_len": state.engine.max_seq_len}
            for name, path in list(slots.paths.items())]


@router.get("/v1/models")
async def models(request: HTTPRequest) -> Dict[str, Any]:
    state = server(request)
    await state.authorize(request)
    return {"object": "list", "data": [state.model_card()] + lora_cards(state)}


@router.get("/v1/models/{name:path}")
async def one_model(name: str, request: HTTPRequest) -> Dict[str, Any]:
    state = server(request)
    await state.authorize(request)
    if name == state.model:
        return state.model_card()
    for card in lora_cards(state):
        if card["id"] == name:
            return card
    raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model!r}"[:400],
                   param="model", code="model_not_found")


async def _admin_body(request: HTTPRequest) -> Dict[str, Any]:
    """The body of a load or unload, its lora_name checked (404 when LoRA loading is off, after the key check)."""
    state = server(request)
    await state.authorize(request)
    if not state.lora_loading:
        raise APIError(404, "loading LoRA adapters at run time is off: start the server with "
                            "--enable_lora_loading", code="not_found")
    if state.lora_slots is None:
        raise APIError(400, "this server has no LoRA banks: start it with --lora name=PATH or --max_lora_rank",
                       code="unsupported")
    body = parse_json(await state.read_body(request))
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "'lora_name' must be a non-empty string", param="lora_name")
    if name == state.model:
        raise APIError(400, f"'lora_name' {name!r} is the base model's name", param="lora_name")
    return body


async def _exclusive(state: ServerState, work: Callable[[], None]) -> None:
    """Run `work` in a worker thread while no request is admitted (Scheduler.exclusive); its errors as 400s."""

    def guarded() -> None:
        try:
            state.engine.exclusive(work)
        except (ValueError, FileNotFoundError) as err:
            raise APIError(400, str(err)[:800]) from None

    await run_in_threadpool(guarded)


@router.post("/v1/load_lora_adapter")
async def load(request: HTTPRequest) -> PlainTextResponse:
    body = await _admin_body(request)
    state = server(request)
    name, path = body["lora_name"], body.get("lora_path")
    if not isinstance(path, str) or not path:
        raise APIError(400, "'lora_path' must be the adapter's folder", param="lora_path")
    slots = state.lora_slots
    if name in slots.paths:
        raise APIError(400, f"the LoRA adapter {name!r} is already loaded", param="lora_name")
    await _exclusive(state, lambda: slots.register(name, path))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload(request: HTTPRequest) -> PlainTextResponse:
    body = await _admin_body(request)
    state = server(request)
    name = body["lora_name"]
    slots = state.lora_slots
    if name not in slots.paths:
        raise APIError(404, f"the LoRA adapter {name!r} is not loaded", param="lora_name",
                       code="model_not_found")
    await _exclusive(state, lambda: slots.unregister(name))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
