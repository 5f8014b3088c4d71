"""Browser safety: which Host and Origin headers the server answers, CORS for the origins it lists.

A server on localhost without an API key can be reached by any web page the user visits, in two ways:
  - a cross-site request (a form, or a fetch with mode "no-cors"): browsers send it with the page's Origin;
  - DNS rebinding: the attacker's own name resolves to 127.0.0.1, so the page is "same-origin" with the server,
    and its requests carry the attacker's name in Host.
So by default the server answers only requests whose Host is a loopback name or the address the connection
came in on (an IP literal cannot be rebound), plus --allowed-hosts; and a request with an Origin header only
when that origin is the server itself (its own pages) or one of --allowed-origins, which also get CORS
headers and preflight answers (Starlette's CORSMiddleware). Other requests get 400 (Host) or 403 (Origin)
before any route runs. The JSON endpoints' Content-Type check (415) is in api.py; it keeps "simple" cross-site
requests (text/plain, forms) out even when an Origin is allowed.

Bodies: requests under /web may not upload files (Gradio's upload routes answer 404) and need a
Content-Length no larger than the body cap, so no path reads an unbounded body.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WEB_PREFIX = "/web"

Scope = Dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def split_host(value: str) -> Tuple[str, Optional[int]]:
    """A Host header (or an origin's netloc) as (lower-case name without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal: [::1]:8000
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = value.partition(":")
    return name, int(port) if port.isascii() and port.isdigit() else None


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostOriginGuard:
    """ASGI middleware: refuse other sites' requests (see the module docstring), then CORS for listed origins."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                 max_body_bytes: int = 1 << 20) -> None:
        self.hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        self.origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}
        self.max_body_bytes = max_body_bytes
        listed: List[str] = sorted(self.origins)
        self.app = CORSMiddleware(app, allow_origins=listed, allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
                                  allow_headers=["Authorization", "Content-Type"], max_age=600) if listed else app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message, code = refusal
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope: Scope, headers: Dict[str, str]) -> Optional[Tuple[int, str, str]]:
        """(status, message, code) for a request this server must not answer, else None."""
        host = headers.get("host")
        if host is not None and not self.host_allowed(host, scope):
            return (400, f"the Host header {host[:100]!r} is not this server's: use 127.0.0.1 or localhost, or "
                         "start the server with --allowed-hosts", "invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return (403, f"requests from the web origin {origin[:100]!r} are not allowed: start the server with "
                         "--allowed-origins to allow them", "origin_not_allowed")
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path.startswith(WEB_PREFIX + "/") and method == "POST":
            if path.rstrip("/").rsplit("/", 1)[-1] == "upload":
                return 404, "file uploads are off on this server", "not_found"
            length = headers.get("content-length")
            if length is None or not (length.isascii() and length.isdigit()):
                return 411, "a Content-Length header is required", "length_required"
            if int(length) > self.max_body_bytes:
                return 413, f"the request body exceeds {self.max_body_bytes} bytes", "request_too_large"
        return None

    def host_allowed(self, host: str, scope: Scope) -> bool:
        name, _ = split_host(host)
        if "*" in self.hosts or name in self.hosts or _is_loopback(name):
            return True
        server = scope.get("server")  # the address this connection came in on: an IP literal, never rebound
        return bool(server) and name == str(server[0]).lower()

    def origin_allowed(self, origin: str, host: Optional[str]) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        parts = urlsplit(origin)  # the server's own pages (the chat page) send its own origin
        return host is not None and parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()
