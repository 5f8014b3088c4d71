"""The server's Prometheus metrics (GET /metrics, through prometheus-client: the optional `metrics` extra), and
the request-ID middleware that tags each HTTP request's answer and log line.

Metrics (each server has its own registry):
    llama_http_requests_total{path,status}       answers by route and HTTP status
    llama_requests_finished_total{reason}        engine requests by how they ended (stop, length, cancelled...)
    llama_prompt_tokens_total, llama_generation_tokens_total
    llama_time_to_first_token_seconds            histogram: submit to the first generated token's event
    llama_inter_token_seconds                    histogram: between generated tokens of one request
    llama_queue_depth, llama_kv_rows_in_use, llama_kv_rows_total
    llama_prefix_cache_queries_total, llama_prefix_cache_hits_total   prompt tokens looked up in the prefix cache,
                                                 and of those the ones found cached (as vLLM counts them)
    llama_prefix_cache_hit_rate                  hits / queries since the start (0 before any query)
    llama_prefix_cache_blocks_in_use, llama_prefix_cache_blocks_total   the prefix cache's pool blocks
(the prefix cache's metrics only while it is on)
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Callable, Dict, Optional

log = logging.getLogger("llama.serve")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's X-Request-ID is kept only if it looks like one


class Metrics:
    """The counters and histograms one server updates, and its /metrics text. stats: the scheduler's stats()
    (read at each scrape for the queue and row gauges)."""

    def __init__(self, stats: Callable[[], Dict[str, int]],
                 prefix_stats: Optional[Callable[[], Optional[Dict[str, int]]]] = None) -> None:
        import prometheus_client as prom  # the optional `metrics` extra

        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.http = prom.Counter("llama_http_requests", "HTTP answers by route and status", ["path", "status"],
                                 registry=r)
        self.finished = prom.Counter("llama_requests_finished", "Engine requests by how they ended", ["reason"],
                                     registry=r)
        self.prompt_tokens = prom.Counter("llama_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = prom.Counter("llama_generation_tokens", "Generated tokens", registry=r)
        self.ttft = prom.Histogram("llama_time_to_first_token_seconds", "Submit to first generated token",
                                   buckets=TTFT_BUCKETS, registry=r)
        self.itl = prom.Histogram("llama_inter_token_seconds", "Time between generated tokens of a request",
                                  buckets=ITL_BUCKETS, registry=r)
        prom.Gauge("llama_queue_depth", "Requests waiting for a row", registry=r).set_function(
            lambda: stats()["waiting"])
        prom.Gauge("llama_kv_rows_in_use", "Rows (running choices; alias of llama_requests_running)",
                   registry=r).set_function(lambda: stats()["running"])
        prom.Gauge("llama_kv_rows_total", "Rows: running choices at most (max_batch_size)", registry=r).set_function(
            lambda: stats()["max_batch_size"])
        prom.Gauge("llama_requests_running", "Choices running (holding a row and KV blocks)",
                   registry=r).set_function(lambda: stats()["running"])
        prom.Gauge("llama_requests_waiting", "Requests queued, and choices preempted waiting to resume",
                   registry=r).set_function(lambda: stats()["waiting"])
        prom.Gauge("llama_kv_blocks_in_use", "Paged KV cache blocks held by requests or the prefix cache",
                   registry=r).set_function(lambda: stats().get("kv_blocks_in_use", 0))
        prom.Gauge("llama_kv_blocks_total", "Paged KV cache blocks (16 positions of every layer each)",
                   registry=r).set_function(lambda: stats().get("kv_blocks_total", 0))
        r.register(_PreemptionCollector(stats))
        if prefix_stats is not None:
            r.register(_PrefixCacheCollector(prefix_stats))

    def text(self) -> bytes:
        return self._prom.generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        return self._prom.CONTENT_TYPE_LATEST

    def watch(self, sink: Callable[[Any], None]) -> Callable[[Any], None]:
        """A request's sink that also times its tokens and counts its end (called on the engine thread)."""
        from ..engine import Chunk, Finished

        start = time.perf_counter()
        last: list = [None]

        def watched(event: Any) -> None:
            if isinstance(event, Chunk) and event.tokens:
                now = time.perf_counter()
                if last[0] is None:
                    self.ttft.observe(now - start)
                    gaps = len(event.tokens) - 1
                    gap = 0.0
                else:
                    gaps = len(event.tokens)
                    gap = (now - last[0]) / gaps
                for _ in range(gaps):
                    self.itl.observe(gap)
                last[0] = now
                self.generation_tokens.inc(len(event.tokens))
            elif isinstance(event, Finished):
                self.finished.labels(event.reason).inc()
                if event.index == 0:
                    self.prompt_tokens.inc(event.prompt_tokens)
            sink(event)
        return watched


class _PreemptionCollector:
    """llama_preemptions_total, read from the engine's count at each scrape."""

    def __init__(self, stats: Callable[[], Dict[str, int]]) -> None:
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("llama_preemptions", "Running choices preempted for lack of a free KV block "
                                  "(recomputed when resumed)", value=self.stats().get("preemptions", 0))


class _PrefixCacheCollector:
    """The prefix cache's counters, read from the engine's table at each scrape."""

    def __init__(self, prefix_stats: Callable[[], Optional[Dict[str, int]]]) -> None:
        self.prefix_stats = prefix_stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.prefix_stats()
        if s is None:
            return
        queries, hits = s["prefix_cache_queries"], s["prefix_cache_hits"]
        yield CounterMetricFamily("llama_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=queries)
        yield CounterMetricFamily("llama_prefix_cache_hits", "Prompt tokens found in the prefix cache", value=hits)
        yield GaugeMetricFamily("llama_prefix_cache_hit_rate", "Prefix cache hits / queries, in tokens",
                                value=hits / queries if queries else 0.0)
        yield GaugeMetricFamily("llama_prefix_cache_blocks_in_use", "Prefix cache pool blocks holding KV",
                                value=s["prefix_cache_blocks_in_use"])
        yield GaugeMetricFamily("llama_prefix_cache_blocks_total", "Prefix cache pool blocks",
                                value=s["prefix_cache_blocks_total"])


def optional_metrics(stats: Callable[[], Dict[str, int]],
                     prefix_stats: Optional[Callable[[], Optional[Dict[str, int]]]] = None) -> Optional[Metrics]:
    """Metrics when prometheus-client is installed, else None (/metrics then says how to get it)."""
    try:
        return Metrics(stats, prefix_stats)
    except ImportError:
        return None


class RequestID:
    """ASGI middleware: each HTTP request gets an ID (the client's X-Request-ID when it is 1..128 characters of
    [A-Za-z0-9._:-], else a new one), echoed in the answer's X-Request-ID header and written to the log line
    that records the answer's status and time; its count goes to the metrics by route and status."""

    def __init__(self, app, metrics: Optional[Metrics] = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = sent if REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start, status = time.perf_counter(), [0]

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            path = scope.get("path", "")
            log.info("request %s: %s %s -> %s in %.3f s", rid, scope.get("method"), path, status[0] or "-",
                     time.perf_counter() - start)
            if self.metrics is not None:
                # A bounded label set: the route as the app declares it (/v1/models/{name:path}), else "other".
                known = getattr(scope.get("route"), "path", None) or "other"
                self.metrics.http.labels(known, str(status[0] or 0)).inc()
