"""A tiny stand-in for Meta's signed-URL download host, used by test_download.py.

It serves a fake Llama 2 release (small random files with matching md5
checklists) on 127.0.0.1 and can misbehave on demand: wrong signature -> 403,
an HTML page instead of a file, a corrupted file, a connection cut part-way
through a file, Range headers ignored, or a slow (throttled) file.

Run it by hand to try download.sh against it:

    python tests/download_support/fake_cdn.py
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

SIGNATURE = "s1gn%2Bature=="  # as it appears (percent-encoded) in the query
POLICY = "eyJTdGF0ZW1lbnQiOlt7IlJlc291cmNlIjoiaHR0cHM6Ly8qIn1dfQ__"
KEY_PAIR_ID = "K1234567890ABC"

MODELS = {
    "llama-2-7b": 1,
    "llama-2-13b": 2,
    "llama-2-70b": 8,
    "llama-2-7b-chat": 1,
    "llama-2-13b-chat": 2,
    "llama-2-70b-chat": 8,
}

# The one file big enough for a progress display to be worth showing.
BIG_FILE = "llama-2-7b/consolidated.00.pth"
BIG_SIZE = 2 * 1024 * 1024

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Error</title></head>"
    b"<body><h1>Something went wrong</h1></body></html>\n"
)
XML_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code><Message>Access denied</Message></Error>\n"
)
XML_NOT_FOUND = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>NoSuchKey</Code><Message>Not found</Message></Error>\n"
)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_release(seed: int = 2) -> dict[str, bytes]:
    """Path (relative to the signed URL's '*') -> file contents."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n" * 20,
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n" * 10,
        "tokenizer.model": rng.randbytes(4096),
    }
    files["tokenizer_checklist.chk"] = (
        f"{md5_hex(files['tokenizer.model'])}  tokenizer.model\n".encode()
    )
    for model, shards in MODELS.items():
        lines = []
        for i in range(shards):
            name = f"consolidated.{i:02d}.pth"
            path = f"{model}/{name}"
            size = BIG_SIZE if path == BIG_FILE else 3000 + 100 * i
            # Start like a zip archive, as torch.save files do.
            files[path] = b"PK\x03\x04" + rng.randbytes(size - 4)
            lines.append(f"{md5_hex(files[path])}  {name}\n")
        params = f'{{"dim": 4096, "model": "{model}", "n_layers": 32}}\n'.encode()
        files[f"{model}/params.json"] = params
        lines.append(f"{md5_hex(params)}  params.json\n")
        files[f"{model}/checklist.chk"] = "".join(lines).encode()
    return files


@dataclass
class Behaviour:
    """What the server does; tests change these fields between runs."""

    html: set[str] = field(default_factory=set)  # 200 + HTML page instead
    corrupt: set[str] = field(default_factory=set)  # wrong bytes, same size
    status: dict[str, int] = field(default_factory=dict)  # forced HTTP status
    cut_once: dict[str, int] = field(default_factory=dict)  # close after N bytes, once
    throttle: dict[str, float] = field(default_factory=dict)  # seconds per 16 KiB
    ignore_range: bool = False


class _QuietServer(ThreadingHTTPServer):
    """Clients hanging up mid-transfer (Ctrl-C, cut tests) are expected."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    sent: int


class FakeCDN:
    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files = files if files is not None else make_release()
        self.behaviour = Behaviour()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "FakeCDN":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.behaviour = Behaviour()
            self.requests.clear()

    # -- helpers for tests -------------------------------------------------
    def url(self, signature: str = SIGNATURE, host: str | None = None) -> str:
        host = host or f"127.0.0.1:{self.port}"
        return (
            f"http://{host}/*?Policy={POLICY}&Signature={signature}"
            f"&Key-Pair-Id={KEY_PAIR_ID}"
        )

    def fetched(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    # -- the handler -------------------------------------------------------
    def _handler_class(self):
        cdn = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "FakeCDN/1.0"

            def log_message(self, format, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _send(self, status, body, ctype, head, extra=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return len(body)

            def _serve(self, head):
                parts = urlsplit(self.path)
                path = unquote(parts.path).lstrip("/")
                rng = self.headers.get("Range")
                b = cdn.behaviour
                # parse_qs would decode %2B; compare the raw query text instead.
                raw = dict(
                    kv.split("=", 1) for kv in parts.query.split("&") if "=" in kv
                )
                ok_sig = (
                    raw.get("Signature") == SIGNATURE
                    and raw.get("Policy") == POLICY
                    and raw.get("Key-Pair-Id") == KEY_PAIR_ID
                    and set(parse_qs(parts.query)) == {"Policy", "Signature", "Key-Pair-Id"}
                )
                if not ok_sig or b.status.get(path) == 403:
                    sent = self._send(403, XML_DENIED, "text/xml", head)
                    return cdn._record(Request(path, rng, 403, sent))
                if path in b.status:
                    code = b.status[path]
                    sent = self._send(code, XML_NOT_FOUND, "text/xml", head)
                    return cdn._record(Request(path, rng, code, sent))
                if path not in cdn.files:
                    sent = self._send(404, XML_NOT_FOUND, "text/xml", head)
                    return cdn._record(Request(path, rng, 404, sent))
                if path in b.html:
                    sent = self._send(200, HTML_PAGE, "text/html; charset=utf-8", head)
                    return cdn._record(Request(path, rng, 200, sent))

                data = cdn.files[path]
                if path in b.corrupt:
                    data = bytes(x ^ 0x5A for x in data)
                total = len(data)
                start = 0
                if rng and not b.ignore_range:
                    spec = rng.strip()
                    if spec.startswith("bytes=") and spec.endswith("-"):
                        start = int(spec[6:-1])
                        if start >= total:
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{total}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return cdn._record(Request(path, rng, 416, 0))
                status = 206 if start else 200
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{total - 1}/{total}"
                    )
                self.end_headers()
                if head:
                    return cdn._record(Request(path, rng, status, 0))

                cut = None
                with cdn._lock:
                    if path in b.cut_once:
                        cut = b.cut_once.pop(path)
                delay = b.throttle.get(path)
                sent = 0
                try:
                    if cut is not None:
                        self.wfile.write(body[:cut])
                        self.wfile.flush()
                        sent = len(body[:cut])
                        self.close_connection = True
                    elif delay:
                        step = 16 * 1024
                        for off in range(0, len(body), step):
                            self.wfile.write(body[off : off + step])
                            self.wfile.flush()
                            sent += len(body[off : off + step])
                            time.sleep(delay)
                    else:
                        self.wfile.write(body)
                        sent = len(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                cdn._record(Request(path, rng, status, sent))

        return Handler


if __name__ == "__main__":
    cdn = FakeCDN().start()
    print("Fake signed URL (Ctrl-C to stop):")
    print(cdn.url())
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cdn.stop()
