"""GET /health (liveness and load: 200 while serving, 503 while draining or after a failure; HEAD too) and
GET /metrics (Prometheus text, metrics.py; behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response

from .errors import APIError
from .state import server

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: HTTPRequest) -> JSONResponse:
    engine = server(request).engine
    status = "failed" if engine.failure is not None else "draining" if engine.draining else "ok"
    return JSONResponse({"status": status, **engine.stats(), "finished": dict(engine.finished)},
                        status_code=200 if status == "ok" else 503)


@router.get("/metrics")
async def metrics(request: HTTPRequest) -> Response:
    state = server(request)
    await state.authorize(request)
    if state.meter is None:
        raise APIError(404, "metrics are off" if not state.metrics_on else
                       "metrics need prometheus-client: pip install 'llama[metrics]'", code="not_found")
    return Response(state.meter.text(), media_type=state.meter.content_type)
