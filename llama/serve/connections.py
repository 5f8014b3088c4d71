"""Connection hygiene for uvicorn: time limits, fair caps on open connections, quiet logs.

uvicorn's own settings cover part of it: `timeout_keep_alive` closes a connection idle between requests and
`h11_max_incomplete_event_size` caps a request's head while it arrives in pieces. `guarded_h11` adds to its
HTTP/1.1 protocol what uvicorn 0.55 lacks:
- a limit on how long a request's head may take to arrive (a "slowloris" client sends a header byte now and
  then and holds its socket forever);
- the head's size limit also for a head that arrives whole, in one write (h11 checks only incomplete heads);
- caps that count every open connection, idle ones too: max_client_connections from one client address, and
  max_connections in all. Beyond max_connections, RESERVED_CONNECTIONS more connections may ask only GET
  /health or /metrics (with PROBE_TIMEOUT for their head), so that monitoring works while the server is full;
  every other refusal is an OpenAI-style JSON 503, written before the connection is closed.
The body's own time limit is in api.py. `server_config` puts the settings together, for the command line and
the tests alike.

When the process runs out of file descriptors, every accept fails and asyncio logs each failure with its
traceback; `quiet_accept_errors` logs the first and then one line per ACCEPT_LOG_EVERY seconds with a count
(and drops asyncio's report of an accept retried after the server closed its socket). `rate_limit_logs` does
the same for every warning and error of the server, per cause (the logger and the message's template): a
client that sends the same bad request again and again cannot flood the log.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import (HEADER_TIMEOUT, KEEP_ALIVE_TIMEOUT, LOG_EVERY, MAX_CLIENT_CONNECTIONS, MAX_CONNECTIONS,
                     MAX_HEAD_BYTES, PROBE_TIMEOUT, RESERVED_CONNECTIONS)

log = logging.getLogger("llama.serve")

ACCEPT_LOG_EVERY = 10.0  # seconds between two log lines about failing accepts
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

PROBES = (b"/health", b"/metrics")  # what a connection beyond max_connections may ask for
_PHRASES = {431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _refusal(status: int, message: str, code: str) -> bytes:
    """A whole HTTP response with OpenAI's error JSON, that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    retry = b"retry-after: 1\r\n" if status == 503 else b""
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n%scontent-length: %d\r\n\r\n%s"
            % (status, _PHRASES[status], retry, len(body), body))


def _head_size(event: h11.Request) -> int:
    """The bytes of a request's line and headers (as parsed: within a few bytes of what was sent)."""
    return len(event.method) + len(event.target) + 12 + sum(len(n) + len(v) + 4 for n, v in event.headers)


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a time limit and a whole-head size limit on each request's head, and
    caps on open connections (see the module docstring)."""

    header_timeout = HEADER_TIMEOUT
    max_connections = MAX_CONNECTIONS
    max_client_connections = MAX_CLIENT_CONNECTIONS
    reserved = RESERVED_CONNECTIONS
    max_head_bytes = MAX_HEAD_BYTES
    _head_timer: Optional[asyncio.TimerHandle] = None
    _probe_only = False  # beyond max_connections: only PROBES are answered on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        mine = sum(1 for c in self.connections if host is not None and getattr(c, "client", None)
                   and c.client[0] == host)
        if host is not None and mine > self.max_client_connections:
            return self._refuse(503, f"too many open connections from your address (at most "
                                     f"{self.max_client_connections}): close some, or retry later", "overloaded")
        if len(self.connections) > self.max_connections + self.reserved:
            return self._refuse(503, "too many open connections: retry later", "overloaded")
        if len(self.connections) > self.max_connections:
            self._probe_only = True
            self.header_timeout = min(self.header_timeout, PROBE_TIMEOUT)
        self.conn.next_event = self._next_event  # type: ignore[method-assign]
        self._arm()

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_refusal(status, message, code))
            self.transport.close()

    def _next_event(self) -> Any:
        """h11's next event, with a request whose head is too big, or that a reserved connection may not ask,
        refused (the connection then reads nothing more)."""
        event = h11.Connection.next_event(self.conn)
        if isinstance(event, h11.Request):
            if _head_size(event) > self.max_head_bytes:
                self._refuse(431, f"the request line and headers exceed {self.max_head_bytes} bytes",
                             "request_header_too_large")
                return h11.NEED_DATA
            if self._probe_only and event.target.split(b"?")[0] not in PROBES:
                self._refuse(503, "too many open connections: only GET /health and /metrics are answered now; "
                                  "retry later", "overloaded")
                return h11.NEED_DATA
        return event

    def handle_events(self) -> None:
        super().handle_events()
        if self._probe_only and self.cycle is not None:
            self.cycle.keep_alive = False  # a reserved connection closes after its one answer

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._waiting_for_head():
            self._arm()  # a new request starts arriving (uvicorn just cancelled its keep-alive timer)
        super().data_received(data)
        if not self._waiting_for_head():
            self._disarm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()


def guarded_h11(header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                max_client_connections: Optional[int] = None, max_head_bytes: int = MAX_HEAD_BYTES) -> type:
    """uvicorn's H11Protocol with these limits (a class to pass as uvicorn.Config(http=...)).
    max_client_connections: None means min(MAX_CLIENT_CONNECTIONS, max_connections)."""
    if max_client_connections is None:
        max_client_connections = min(MAX_CLIENT_CONNECTIONS, max_connections)
    if header_timeout <= 0 or max_connections < 1 or max_client_connections < 1 or max_head_bytes < 1:
        raise ValueError(f"header_timeout must be > 0 and max_connections, max_client_connections and "
                         f"max_head_bytes >= 1, got {header_timeout}, {max_connections}, {max_client_connections} "
                         f"and {max_head_bytes}")
    return type("GuardedH11", (_GuardedH11,), {"header_timeout": header_timeout, "max_connections": max_connections,
                                               "max_client_connections": max_client_connections,
                                               "max_head_bytes": max_head_bytes})


def server_config(app: Any, header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                  max_client_connections: Optional[int] = None, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's Config for `app` with the connection limits above (kwargs: any other Config setting). uvicorn's
    own limit_concurrency stays off: its 503 is plain text, and the caps above come first."""
    settings: Dict[str, Any] = dict(timeout_keep_alive=KEEP_ALIVE_TIMEOUT, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    settings.update(kwargs)
    rate_limit_logs()
    return uvicorn.Config(app, http=guarded_h11(header_timeout, max_connections, max_client_connections),
                          **settings)


class RateLimit(logging.Filter):
    """Passes the first warning or error of each cause (logger and message template), then one per `every`
    seconds, noting how many were dropped meanwhile; lower levels always pass."""

    MAX_CAUSES = 1000  # causes remembered at most (then the memory starts over)

    def __init__(self, every: float = LOG_EVERY) -> None:
        super().__init__()
        self.every = every
        self.lock = threading.Lock()
        self.seen: Dict[Tuple[str, str], Tuple[float, int]] = {}  # cause -> (when last passed, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        cause = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self.lock:
            last, dropped = self.seen.get(cause, (-float("inf"), 0))
            if now - last < self.every:
                self.seen[cause] = (last, dropped + 1)
                return False
            if len(self.seen) >= self.MAX_CAUSES:
                self.seen.clear()
            self.seen[cause] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this in the last {self.every:g} s were not logged)"
        return True


LOGGERS = ("llama.serve", "llama.engine", "uvicorn.error")  # the server's loggers that rate_limit_logs limits


def rate_limit_logs(every: float = LOG_EVERY) -> None:
    """Put a RateLimit filter on the server's loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(every))


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every: float = ACCEPT_LOG_EVERY) -> None:
    """Rate-limit the loop's reports of failing accepts (out of file descriptors): the first is logged, then at
    most one line per `every` seconds, with how many there were. Other reports go where they went before."""
    previous = loop.get_exception_handler()
    state = {"last": -float("inf"), "count": 0}

    def handler(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRORS and "accept" in context.get("message", ""):
            state["count"] += 1
            now = time.monotonic()
            if now - state["last"] >= every:
                log.error("cannot accept connections: %s (%d time(s) in the last %g s; raise the open-file limit, "
                          "ulimit -n, or lower --max_connections)", exc, state["count"], every)
                state["last"], state["count"] = now, 0
            return
        if isinstance(exc, ValueError) and "_start_serving" in repr(context.get("handle")):
            # asyncio retries a failed accept a second later, even when the listening socket has been closed
            # meanwhile (the server shut down): nothing is left to serve, so there is nothing to report.
            log.debug("an accept retried after the listening socket closed: %s", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
