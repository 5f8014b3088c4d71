"""Connection hygiene for uvicorn: time limits and a cap on open connections, and quiet accept errors.

uvicorn's own settings cover part of it: `timeout_keep_alive` closes a connection idle between requests,
`limit_concurrency` answers 503 once that many connections or requests are open, and
`h11_max_incomplete_event_size` caps a request's head. What uvicorn 0.55 lacks is a limit on how long a
request's head may take to arrive (a "slowloris" client sends a header byte now and then and holds its socket
forever) and a cap that also counts connections that never finish a request. `guarded_h11` adds both to its
HTTP/1.1 protocol; the body's own time limit is in api.py. `server_config` puts the settings together, for the
command line and the tests alike.

When the process runs out of file descriptors, every accept fails and asyncio logs each failure with its
traceback; `quiet_accept_errors` logs the first and then one line per ACCEPT_LOG_EVERY seconds with a count
(and drops asyncio's report of an accept retried after the server closed its socket).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any, Dict, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import HEADER_TIMEOUT, KEEP_ALIVE_TIMEOUT, MAX_CONNECTIONS, MAX_HEAD_BYTES

log = logging.getLogger("llama.serve")

ACCEPT_LOG_EVERY = 10.0  # seconds between two log lines about failing accepts
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_BUSY_BODY = (b'{"error": {"message": "too many open connections", "type": "server_error", "param": null, '
              b'"code": "overloaded"}}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a time limit on each request's head and a cap on open connections."""

    header_timeout = HEADER_TIMEOUT
    max_connections = MAX_CONNECTIONS
    _head_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_BUSY)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
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


def guarded_h11(header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> type:
    """uvicorn's H11Protocol with these limits (a class to pass as uvicorn.Config(http=...))."""
    if header_timeout <= 0 or max_connections < 1:
        raise ValueError(f"header_timeout must be > 0 and max_connections >= 1, got {header_timeout} and "
                         f"{max_connections}")
    return type("GuardedH11", (_GuardedH11,), {"header_timeout": header_timeout, "max_connections": max_connections})


def server_config(app: Any, header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                  **kwargs: Any) -> uvicorn.Config:
    """uvicorn's Config for `app` with the connection limits above (kwargs: any other Config setting)."""
    settings: Dict[str, Any] = dict(timeout_keep_alive=KEEP_ALIVE_TIMEOUT, limit_concurrency=max_connections,
                                    h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    settings.update(kwargs)
    return uvicorn.Config(app, http=guarded_h11(header_timeout, max_connections), **settings)


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
