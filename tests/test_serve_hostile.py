"""Hostile requests, as an attacker would send them, while two ordinary streams run (issue 33).

Each hostile request gets a 200 or a 4xx that names its field, with an error body of at most 1 KB; none gets a
500; no chunk of a running stream waits over MAX_PAUSE seconds for the next; /health answers throughout. The
fuzzing of test_serve_fuzz runs here too, under the same watch.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e \".[serve]\"")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e \".[serve]\"")
pytest.importorskip("llguidance", reason="the structured extra is not installed: pip install -e \".[structured]\"")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")

from helpers import MHA, TOKENIZER, make_checkpoint  # noqa: E402
from llama import Llama  # noqa: E402
from serve_support import TIMEOUT, ProcessServer, ThreadServer, ports_refuse, wait_until  # noqa: E402

C, CC = "/v1/completions", "/v1/chat/completions"
MAX_PAUSE = 1.0  # seconds a running stream may wait for its next chunk while a hostile request is handled
EOS = 2


def optional_properties(n: int) -> Dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


def schema(spec: Dict[str, Any]) -> Dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": spec}}}


# (name, endpoint, body, the statuses allowed, the field a 4xx must name: the error's param starts with it)
HOSTILE: List[Tuple[str, str, Dict[str, Any], Tuple[int, ...], Optional[str]]] = [
    ("10,000 optional properties", CC, schema(optional_properties(10_000)), (400,), "response_format"),
    ("600 optional properties", CC, schema(optional_properties(600)), (200, 400), "response_format"),
    ("a schema only the empty answer matches", CC, schema({"$ref": "#"}), (400,), "response_format"),
    ("regex (a{1000}){1000}", C, {"structured_outputs": {"regex": "(a{1000}){1000}"}}, (400,), "structured_outputs"),
    ("an empty regex", C, {"structured_outputs": {"regex": ""}}, (400,), "structured_outputs"),
    ("a Lark grammar without an end", C, {"structured_outputs": {"grammar": "start: x\nx: \"a\" x"}}, (200, 400),
     "structured_outputs"),
    ("a superscript logit_bias key", C, {"logit_bias": {"²": 1}}, (400,), "logit_bias"),
    ("an Arabic-Indic logit_bias key", C, {"logit_bias": {"١": 1}}, (400,), "logit_bias"),
    ("a 400-digit logit_bias key", C, {"logit_bias": {"9" * 400: 1}}, (400,), "logit_bias"),
    ("a 900 KB stop string", C, {"stop": "x" * 900_000}, (400,), "stop"),
    ("a 1,001-character stop string", C, {"stop": ["y" * 1001]}, (400,), "stop"),
    ("five stop strings", C, {"stop": ["a", "b", "c", "d", "e"]}, (400,), "stop"),
    ("four stop strings of 1,000 characters", C, {"stop": ["z" * 1000] * 4}, (200,), None),
    ("max_completion_tokens 0", CC, {"max_completion_tokens": 0}, (400,), "max_completion_tokens"),
    ("max_tokens 0 on chat", CC, {"max_tokens": 0}, (400,), "max_tokens"),
    ("n 8", C, {"n": 8}, (200, 400), "n"),  # n = 8 needs 8 rows; this server has 4: a 400 naming n
    ("a JSON key path of 5,000 characters", C, {"prompt": {"k" * 5000: "\ud800"}}, (400,), "prompt"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("hostile"), MHA, seed=3)
    gen = Llama.build(str(folder), str(TOKENIZER), max_seq_len=512, max_batch_size=4, device="cpu", dtype="float32")
    with ThreadServer(gen, model="m", max_queue=8, config={"max_client_connections": 40}) as s:
        yield s


class Watch:
    """Two ordinary streams, restarted as they end, and a /health poll: the longest wait between two chunks of
    one stream, and every /health answer's status and time."""

    STREAM = {"model": "m", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": True,
              "logit_bias": {str(EOS): -100}}

    def __init__(self, server: ThreadServer) -> None:
        self.url = server.url
        self.done = threading.Event()
        self.gaps: List[Tuple[float, float]] = []  # (start, end) of each wait over 0.1 s between two chunks
        self.health: List[Tuple[int, float]] = []  # (status, seconds to answer)
        self.streams = 0
        self.pool = ThreadPoolExecutor(3)

    def __enter__(self) -> "Watch":
        self.futures = [self.pool.submit(self._stream) for _ in range(2)] + [self.pool.submit(self._poll)]
        wait_until(lambda: self.streams >= 2, "the ordinary streams to start")
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for f in self.futures:
            f.result(TIMEOUT)
        self.pool.shutdown()

    def _stream(self) -> None:
        while not self.done.is_set():
            with httpx.stream("POST", self.url + C, json=self.STREAM, timeout=TIMEOUT) as r:
                assert r.status_code == 200, r.read()
                last, chunks = None, 0
                for line in r.iter_lines():
                    now = time.monotonic()
                    if not line.startswith("data: "):
                        continue
                    if last is None:
                        self.streams += 1
                    elif now - last > 0.1:
                        self.gaps.append((last, now))
                    last, chunks = now, chunks + 1
                    if line != "data: [DONE]":
                        assert "error" not in json.loads(line[6:]), line
                assert chunks > 100, chunks

    def _poll(self) -> None:
        while not self.done.is_set():
            start = time.monotonic()
            r = httpx.get(self.url + "/health", timeout=TIMEOUT)
            self.health.append((r.status_code, time.monotonic() - start))
            time.sleep(0.05)

    def pause(self, start: float, end: float) -> float:
        """The longest wait between two chunks of a stream that overlaps the time from start to end."""
        return max((b - a for a, b in list(self.gaps) if a < end and b > start), default=0.0)

    def timed(self, send: Callable[[], Any]) -> Tuple[Any, float]:
        """send()'s result and the longest pause of a running stream while it ran. This machine is shared: a
        pause over MAX_PAUSE is sent again (up to twice) and the shortest counts, since a pause the request
        causes comes back each time while one from another program's load does not."""
        best = (None, float("inf"))
        for _ in range(3):
            start = time.monotonic()
            result = send()
            time.sleep(0.2)  # a pause that began during the request shows up in the gaps once it is over
            best = min(best, (result, self.pause(start, time.monotonic())), key=lambda pair: pair[1])
            if best[1] < MAX_PAUSE:
                break
        return best

    def check(self) -> None:
        assert self.health and all(s == 200 for s, _ in self.health), self.health[-5:]


def _check_error(r: httpx.Response, field: Optional[str]) -> None:
    assert len(r.content) <= 1024, f"an error body of {len(r.content)} bytes"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if field is not None:
        assert (error["param"] or "").startswith(field), (field, error)


def test_hostile_requests_get_a_4xx_naming_their_field_and_stall_nobody(server):
    base = {C: {"model": "m", "prompt": "Hi", "max_tokens": 8}, CC: {"model": "m", "max_tokens": 8,
                                                                     "messages": [{"role": "user", "content": "Hi"}]}}
    with Watch(server) as watch, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        for name, path, extra, allowed, field in HOSTILE:
            for stream in (False, True):
                content = json.dumps({**base[path], **extra, "stream": stream}).encode()
                start = time.monotonic()
                r, pause = watch.timed(lambda: client.post(path, content=content,
                                                           headers={"Content-Type": "application/json"}))
                took = time.monotonic() - start
                assert pause < MAX_PAUSE, f"{name}: a running stream waited {pause:.2f} s for its next chunk"
                assert r.status_code in allowed, (name, stream, r.status_code, r.text[:300])
                if r.status_code >= 400:
                    _check_error(r, field)
                    assert took < 10, f"{name}: refused after {took:.1f} s"
                elif stream:
                    assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, (name, r.text[-300:])
    watch.check()
    assert server.engine.failure is None and server.engine.finished["error"] == 0


def test_fuzzing_stalls_nobody(server):
    """test_serve_fuzz's requests (a smaller sample) under the same watch: no 5xx but documented overload."""
    hypothesis = pytest.importorskip("hypothesis")
    from test_serve_fuzz import OVERLOAD, REQUEST

    with Watch(server) as watch, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(REQUEST)
        def fuzz(req) -> None:
            path, method, body, content_type = req
            body = body.replace(b'"model": "f"', b'"model": "m"')
            headers = {"Content-Type": content_type} if content_type else {}
            r, pause = watch.timed(lambda: client.request(method, path, content=body or None, headers=headers))
            assert pause < MAX_PAUSE, (req, f"a running stream waited {pause:.2f} s for its next chunk")
            assert r.status_code < 500 or r.status_code in OVERLOAD, (req, r.status_code, r.text[:300])
            if method != "HEAD" and r.status_code >= 400:
                _check_error(r, None)

        fuzz()
    watch.check()
    assert server.engine.failure is None


def test_a_grammar_failing_mid_answer_ends_that_request_alone(server, monkeypatch):
    """A matcher that fails after a few tokens (a limit reached mid-answer): that request gets a 400 (or, streamed,
    an error event) naming its field, code grammar_failed, with a short message; the server serves on."""
    from llama.engine import grammar

    real = grammar.Constraint.mask

    def failing(self, logits):  # from its third mask on, as a matcher in llguidance's error state does
        self.masks = getattr(self, "masks", 0) + 1
        if self.masks >= 3:
            raise grammar.GrammarError("the grammar failed mid-answer: Parser Error: a limit, reached")
        return real(self, logits)

    monkeypatch.setattr(grammar.Constraint, "mask", failing)
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30,
            **schema({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})}
    with Watch(server) as watch:
        r, pause = watch.timed(lambda: httpx.post(server.url + CC, json=body, timeout=TIMEOUT))
        assert pause < MAX_PAUSE, f"a running stream waited {pause:.2f} s for its next chunk"
        assert r.status_code == 400 and r.json()["error"]["code"] == "grammar_failed", r.text
        _check_error(r, "response_format")
        r = httpx.post(server.url + CC, json={**body, "stream": True}, timeout=TIMEOUT)
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "grammar_failed" and r.text.rstrip().endswith("data: [DONE]")
        assert len(json.dumps(events[-1])) <= 1024
    watch.check()
    assert server.engine.failure is None
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200


# --- connections ---------------------------------------------------------------------------------------------


def _connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    host, port = url[len("http://"):].split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT, source_address=(source, 0))


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not part:
            break
        data += part
    return data


def test_a_request_head_over_the_limit_is_refused_however_it_arrives(server):
    from llama.serve.limits import MAX_HEAD_BYTES

    head = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * 60_000 + b"\r\n\r\n")
    with _connect(server.url) as sock:
        sock.sendall(head)  # one write
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_header_too_large" and str(MAX_HEAD_BYTES) in body["error"]["message"]
    with _connect(server.url) as sock:  # in pieces: h11's own limit
        for i in range(0, len(head), 1000):
            try:
                sock.sendall(head[i:i + 1000])
            except OSError:
                break
        assert _answer(sock).startswith((b"HTTP/1.1 4", b""))
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("header", [b"Host: 127.0.0.1:\xb2", b"Content-Length: \xb2"])
def test_non_ascii_digits_in_headers_are_no_500(server, header):
    """A superscript two (latin-1 0xB2, which str.isdigit accepts and int refuses) where a port or a length goes."""
    host = b"" if header.startswith(b"Host") else b"Host: 127.0.0.1\r\n"
    with _connect(server.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\n" + host + header +
                     b"\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]


def test_one_client_cannot_take_every_connection(tmp_path):
    """Per-address cap: one address holding its share of idle connections gets JSON 503s, another address is
    served; when all connections are taken, /health and /metrics are still answered on the reserved ones."""
    folder = make_checkpoint(tmp_path, MHA, seed=3)
    gen = Llama.build(str(folder), str(TOKENIZER), max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    config = {"max_connections": 6, "max_client_connections": 3}
    with ThreadServer(gen, model="m", config=config) as server:
        state = server.server.server_state
        idle = [_connect(server.url, "127.0.0.2") for _ in range(3)]
        try:
            wait_until(lambda: len(state.connections) >= 3, "the idle connections")
            with _connect(server.url, "127.0.0.2") as extra:
                extra.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = _answer(extra)
            assert answer.startswith(b"HTTP/1.1 503") and b"application/json" in answer.split(b"\r\n\r\n")[0]
            assert "your address" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
            assert httpx.get(server.url + "/v1/models", timeout=TIMEOUT).status_code == 200  # 127.0.0.1: served
            idle += [_connect(server.url, "127.0.0.3") for _ in range(3)]  # now all 6 are taken
            wait_until(lambda: len(state.connections) >= 6, "the idle connections")
            for path, status in ((b"/health", b"200"), (b"/metrics", b"200"), (b"/v1/models", b"503")):
                with _connect(server.url, "127.0.0.4") as probe:
                    probe.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    answer = _answer(probe)  # the reserved connection closes after its answer
                assert answer.startswith(b"HTTP/1.1 " + status), (path, answer[:200])
                if status == b"503":
                    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "overloaded"
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: httpx.get(server.url + "/v1/models", timeout=TIMEOUT).status_code == 200,
                   "the server to serve again once the idle connections closed", every=0.1)


def test_errors_are_logged_at_a_bounded_rate_per_cause(caplog):
    import logging

    from llama.serve.connections import RateLimit

    logger = logging.getLogger("llama.test_rate")
    logger.addFilter(RateLimit(every=60))
    with caplog.at_level(logging.INFO, logger="llama.test_rate"):
        for i in range(500):
            logger.error("request %s failed", i)
            logger.warning("another cause %s", i)
            logger.info("an access line %s", i)
    messages = caplog.messages
    assert sum("failed" in m for m in messages) == 1 and sum("another cause" in m for m in messages) == 1
    assert sum("access line" in m for m in messages) == 500


# --- shutdown ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_loop(tmp_path_factory):
    from test_streaming import HELLO, WORLD, scripted_checkpoint

    return scripted_checkpoint(tmp_path_factory.mktemp("loop"), {None: [HELLO, WORLD, WORLD]})


@pytest.mark.parametrize("how", ["second ctrl-c", "drain_timeout 0"])
def test_shutdown_ends_each_stream_with_a_last_event(long_loop, how):
    args = ["--ckpt_dir", str(long_loop), "--tokenizer_path", str(TOKENIZER), "--max_seq_len", "8192",
            "--max_batch_size", "2", "--dtype", "float32", "--model", "loop"]
    server = ProcessServer(args + (["--drain_timeout", "0"] if how == "drain_timeout 0" else []))
    try:
        lines: List[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": "loop", "prompt": "x", "max_tokens": 8000, "temperature": 0, "stream": True}
            with httpx.stream("POST", server.url + C, json=body, timeout=TIMEOUT) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        with ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(stream)
            assert first.wait(TIMEOUT)
            start = time.monotonic()
            if how == "second ctrl-c":
                server.proc.send_signal(signal.SIGINT)
                wait_until(lambda: ports_refuse(server.url), "the drain to start (the port closes)")
                server.proc.send_signal(signal.SIGINT)
                rc = server.proc.wait(TIMEOUT)
            else:
                rc = server.terminate()
            streaming.result(TIMEOUT)
            took = time.monotonic() - start
        assert rc == 0, server.text()
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert took < 15, f"the shutdown took {took:.1f} s"
    finally:
        server.kill()


def test_grammar_budget_time_and_busy_workers(monkeypatch):
    """A build past its time is a ValueError saying so; when every worker stays busy, GrammarBusy (a 429)."""
    from concurrent.futures import ThreadPoolExecutor as Pool

    from llama.engine import grammar
    from llama.tokenizer import Tokenizer

    tok = Tokenizer(str(TOKENIZER))
    slow = threading.Event()
    monkeypatch.setattr(grammar, "_build", lambda *args: slow.wait(TIMEOUT))
    with pytest.raises(ValueError, match="takes over 0.2 s"):
        grammar.Grammar.compile("regex", "a+", tok, [EOS], 32000, timeout=0.2)
    monkeypatch.setattr(grammar, "_pool", Pool(1))
    grammar._pool.submit(slow.wait, TIMEOUT)  # the only worker, busy
    try:
        with pytest.raises(grammar.GrammarBusy):
            grammar.Grammar.compile("regex", "a+", tok, [EOS], 32000, timeout=0.2)
    finally:
        slow.set()
        grammar._pool.shutdown()
