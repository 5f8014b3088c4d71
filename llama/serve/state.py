"""The server's state, on `app.state.server`: what every route reads (the engine, the model's name, the limits,
the API key, the metrics, the shield, the LoRA registry), and the checks routes share: the API key, the body
(its type, size and time), and whether the server takes new requests.

Routes are plain functions in their routers (completion_routes, model_routes, health_routes, tokenize, web) that
get this object with `server(request)`; api.create_app builds it once.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from fastapi import Request as HTTPRequest

from ..generation import Llama
from .errors import APIError
from .limits import AUTH_DELAY, BODY_TIMEOUT, MAX_BODY_BYTES
from .metrics import Metrics
from .scheduler import Scheduler
from .shield import Shield


@dataclass
class ServerState:
    """One server's settings and shared parts. api_key: required as a bearer token on /v1/* and the other API
    routes (None: no key); metrics_on: whether metrics were asked for (meter: None when off or when
    prometheus-client is missing)."""

    engine: Scheduler
    model: str
    api_key: Optional[str] = None
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after: int = 1
    body_timeout: float = BODY_TIMEOUT
    auth_delay: float = AUTH_DELAY
    shield: Optional[Shield] = None
    meter: Optional[Metrics] = None
    metrics_on: bool = True
    lora_loading: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def generator(self) -> Llama:
        return self.engine.generator

    @property
    def lora_slots(self) -> Optional[Any]:
        """The adapters served by name (llama/checkpoints/lora_slots.py), or None without LoRA banks."""
        return getattr(self.engine.generator.model, "lora_slots", None)

    async def authorize(self, request: HTTPRequest) -> None:
        """401 unless the request carries the API key (compared in constant time; a wrong one waits auth_delay,
        which slows a guesser down without holding up anyone else)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())):
            await asyncio.sleep(self.auth_delay)
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: HTTPRequest) -> bytes:
        """The whole body: 415 unless JSON, 413 over max_body_bytes (refused before it is read whole), 408 when
        it does not arrive within body_timeout."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(415, f"the request body must be application/json, got "
                                f"{media[:100] or 'no Content-Type'!r}: send 'Content-Type: application/json'",
                           code="unsupported_media_type")
        too_big = APIError(413, f"the request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > self.max_body_bytes):
            raise too_big
        body = bytearray()

        async def read() -> None:
            async for part in request.stream():
                body.extend(part)
                if len(body) > self.max_body_bytes:
                    raise too_big

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="request_timeout") from None
        return bytes(body)

    def available(self) -> None:
        """503 (with Retry-After) while draining or after an engine failure."""
        if self.engine.failure is not None or self.engine.draining:
            raise APIError(503, self.engine.failure or "the server is shutting down", code="unavailable",
                           headers={"Retry-After": str(self.retry_after)})

    def model_card(self) -> Dict[str, Any]:
        """The base model's card in /v1/models."""
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "llama",
                "max_seq_len": self.engine.max_seq_len, "chat_format": self.generator.prompts.describe()}


def server(request: HTTPRequest) -> ServerState:
    """The state of the app serving `request`."""
    return request.app.state.server
