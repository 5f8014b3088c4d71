"""The server against hostile or careless clients: what no request may do to it, what other web sites may not
do through the user's browser, exact completion text, connection limits, and shutdown.

Servers run in a thread of this process (uvicorn over the engine, with the command line's connection
settings) or as `python -m llama.serve` subprocesses. Every wait is bounded; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e \".[serve]\"")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e \".[serve]\"")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e \".[test]\"")

from helpers import MHA, ROOT, TOKENIZER, make_checkpoint  # noqa: E402
from llama import Llama  # noqa: E402
from serve_support import DEMO, TIMEOUT, ProcessServer, ThreadServer, demo_paths, wait_until  # noqa: E402
from test_streaming import BANG, EOS, HELLO, JIE, OMEGA, SHI, SMILE, SPACE, WORLD, scripted_checkpoint  # noqa: E402

C, CC = "/v1/completions", "/v1/chat/completions"
# " Hello 世界😀!Ω world", then EOS: characters from pieces and from byte-fallback tokens (😀 and Ω as bytes).
SCRIPT = [HELLO, SPACE, SHI, JIE] + SMILE + [BANG] + OMEGA + [WORLD, EOS]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Llama:
    folder = scripted_checkpoint(tmp_path_factory.mktemp("script"), {None: SCRIPT})
    return Llama.build(str(folder), str(TOKENIZER), max_seq_len=128, max_batch_size=4, device="cpu",
                       dtype="float32")


@pytest.fixture(scope="module")
def randomly(tmp_path_factory) -> Llama:
    folder = make_checkpoint(tmp_path_factory.mktemp("random"), MHA, seed=7)
    return Llama.build(str(folder), str(TOKENIZER), max_seq_len=128, max_batch_size=4, device="cpu",
                       dtype="float32")


@pytest.fixture(scope="module")
def demo() -> Llama:
    return Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256, max_batch_size=4, device="cpu",
                       dtype="float32")


def whole_text(generator: Llama, prompt: str, answer: List[int]) -> Tuple[str, str]:
    """(the tokenizer's decode of prompt + answer, of the prompt alone): the oracle of a completion's text."""
    tokens = generator.tokenizer.encode(prompt, bos=True, eos=False)
    return generator.tokenizer.decode(tokens + answer), generator.tokenizer.decode(tokens)


def greedy_tokens(generator: Llama, prompt: str, n: int) -> List[int]:
    tokens = generator.tokenizer.encode(prompt, bos=True, eos=False)
    return generator.generate([tokens], n, temperature=0)[0][0]


def streamed(server: ThreadServer, body: Dict) -> Tuple[str, Optional[str], List[Dict]]:
    """(joined text, finish_reason, the log-prob objects of every chunk) of a streamed completion."""
    text, finish, lps = [], None, []
    with httpx.stream("POST", server.url + C, json={**body, "stream": True}, timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
                if choice["logprobs"]:
                    lps.append(choice["logprobs"])
    return "".join(text), finish, lps


# --- exact completion text ---------------------------------------------------------------------------------


def test_completion_text_continues_the_prompt_exactly(scripted):
    """prompt + text is the tokenizer's decode of the whole sequence (the first token's space kept, characters
    from byte-fallback tokens whole), streamed or not, with echo; logprobs' text_offset points into it; </s> is
    not among the tokens."""
    prompt = "The best"
    whole, head = whole_text(scripted, prompt, SCRIPT[:-1])
    assert head == prompt and whole == "The best Hello 世界😀!Ω world"
    with ThreadServer(scripted, model="s") as server:
        client = server.openai()
        r = client.completions.create(model="s", prompt=prompt, max_tokens=20, temperature=0, logprobs=1)
        text = r.choices[0].text
        assert prompt + text == whole and r.choices[0].finish_reason == "stop"
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == len(SCRIPT) - 1 == r.usage.completion_tokens and "</s>" not in lp.tokens
        for token, offset in zip(lp.tokens, lp.text_offset):
            if token.startswith("bytes:"):  # a byte of a character split over tokens: where that character starts
                assert bytes([int(token[-2:], 16)]) in text[offset].encode("utf-8")
            else:
                assert text[offset:].startswith(token), (token, offset, text)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert streamed(server, {"prompt": prompt, "max_tokens": 20, "temperature": 0})[0] == text
        echoed = client.completions.create(model="s", prompt=prompt, max_tokens=20, temperature=0, echo=True)
        assert echoed.choices[0].text == whole
        assert streamed(server, {"prompt": prompt, "max_tokens": 20, "temperature": 0, "echo": True})[0] == whole
        # A prompt of token ids that ends inside a character: its text is what it decodes to up to there.
        ids = scripted.tokenizer.encode(prompt, bos=True, eos=False) + SMILE[:2]
        r = client.completions.create(model="s", prompt=ids, max_tokens=20, temperature=0, echo=True)
        rest = SCRIPT[SCRIPT.index(SMILE[2]):-1]  # the script goes on from the prompt's last byte
        assert r.choices[0].text == scripted.tokenizer.decode(ids + rest) == "The best😀!Ω world"
        # Chat answers are the answer's own text (as Llama.chat_completion gives them): no leading space.
        chat = client.chat.completions.create(model="s", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=20, temperature=0)
        assert chat.choices[0].message.content == "Hello 世界😀!Ω world"


@pytest.mark.parametrize("stop, kept", [(" world", " Hello 世界😀!Ω"), ("😀", " Hello 世界"), ("lo 世", " Hel")])
def test_stop_strings_match_the_exact_text_and_cut_the_logprobs(scripted, stop, kept):
    with ThreadServer(scripted, model="s") as server:
        body = {"prompt": "The best", "max_tokens": 20, "temperature": 0, "stop": stop, "logprobs": 0}
        r = httpx.post(server.url + C, json=body, timeout=TIMEOUT).json()["choices"][0]
        assert (r["text"], r["finish_reason"]) == (kept, "stop")
        offsets = r["logprobs"]["text_offset"]
        assert offsets and all(o < len(kept) for o in offsets)  # no token whose text starts past the cut
        every = httpx.post(server.url + C, json={**body, "stop": None}, timeout=TIMEOUT).json()["choices"][0]
        assert r["logprobs"]["tokens"] == [t for t, o in zip(every["logprobs"]["tokens"],
                                                             every["logprobs"]["text_offset"]) if o < len(kept)]
        text, finish, lps = streamed(server, body)
        assert (text, finish) == (kept, "stop")
        assert [t for lp in lps for t in lp["tokens"]] == r["logprobs"]["tokens"]
        assert [o for lp in lps for o in lp["text_offset"]] == offsets


@pytest.mark.parametrize("which", ["random", "demo"])
def test_completion_text_equals_the_decode_of_the_whole_sequence(request, which):
    """Real vocabularies (Llama 2's 32000 pieces with a random model, the demo model's own): for every prompt,
    prompt + text is the decode of prompt + the library's greedy answer tokens."""
    generator = request.getfixturevalue("randomly" if which == "random" else "demo")
    prompts = ["The best", "Once upon a time, 世界", "a", " leading space", "x\n", "😀"]
    with ThreadServer(generator, model=which) as server:
        client = server.openai()
        for prompt in prompts:
            whole, head = whole_text(generator, prompt, greedy_tokens(generator, prompt, 24))
            r = client.completions.create(model=which, prompt=prompt, max_tokens=24, temperature=0)
            assert head == prompt and prompt + r.choices[0].text == whole, prompt
            assert prompt + streamed(server, {"prompt": prompt, "max_tokens": 24, "temperature": 0})[0] == whole


# --- one request cannot stop the server ------------------------------------------------------------------


def test_extreme_sampling_values_serve_or_are_refused_and_the_server_goes_on(randomly):
    with ThreadServer(randomly, model="r") as server:
        client = server.openai()
        greedy = client.completions.create(model="r", prompt="Hi", max_tokens=8, temperature=0).choices[0].text
        for tiny in (1e-40, 5e-324, 1e-6):  # below the greedy floor: the greedy answer, no overflow
            r = client.completions.create(model="r", prompt="Hi", max_tokens=8, temperature=tiny, seed=1)
            assert r.choices[0].text == greedy
        for bad, param in [({"seed": 2 ** 64}, "seed"), ({"seed": -1}, "seed"), ({"temperature": 2.5}, "temperature"),
                           ({"temperature": 10 ** 400}, "temperature"), ({"top_p": 10 ** 400}, "top_p")]:
            r = httpx.post(server.url + C, json={"prompt": "Hi", **bad}, timeout=TIMEOUT)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        top = client.completions.create(model="r", prompt="Hi", max_tokens=4, temperature=2, seed=2 ** 64 - 1)
        assert top.choices[0].finish_reason == "length"
        assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
        assert client.completions.create(model="r", prompt="Hi", max_tokens=8, temperature=0).choices[0].text == greedy


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "a", "stop": ["\\udfff x"]}', "stop[0]"),
    (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
    (b'{"prompt": "a", "\\ud800": 1}', None),
])
def test_a_lone_surrogate_is_400(randomly, body, param):
    with ThreadServer(randomly, model="r") as server:
        path = CC if b"messages" in body else C
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"},
                       timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and "surrogate" in r.text
        assert r.json()["error"]["code"] == "invalid_json"
        assert httpx.post(server.url + C, json={"prompt": "a", "max_tokens": 2}, timeout=TIMEOUT).status_code == 200


def test_tokenizing_runs_off_the_event_loop(randomly):
    """A long prompt's tokenization must not pause the other streams: it runs in a worker thread."""
    with ThreadServer(randomly, model="r") as server:
        threads = []
        encode = randomly.tokenizer.encode
        randomly.tokenizer.encode = lambda *a, **k: threads.append(threading.current_thread()) or encode(*a, **k)
        try:
            assert httpx.post(server.url + C, json={"prompt": "hi " * 50, "max_tokens": 1},
                              timeout=TIMEOUT).status_code == 200
        finally:
            del randomly.tokenizer.encode
        assert threads and server.thread not in threads and threading.main_thread() not in threads


# --- other web sites ------------------------------------------------------------------------------------


def test_browser_requests_from_other_sites_are_refused(randomly):
    with ThreadServer(randomly, model="r", allowed_origins=["https://app.example"],
                      allowed_hosts=["llama.internal"]) as server:
        ok = {"prompt": "hi", "max_tokens": 1}
        post = lambda **kw: httpx.post(server.url + C, timeout=TIMEOUT, **kw)  # noqa: E731
        # A cross-site form or no-cors fetch can only send "simple" content types: 415.
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {"Content-Type": content_type} if content_type else {}
            r = post(content=json.dumps(ok).encode(), headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", content_type
        # DNS rebinding: the attacker's name in Host.
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = post(json=ok, headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        for host in ("localhost", "127.0.0.1", "[::1]:8000", "llama.internal", "LOCALHOST:1"):
            assert post(json=ok, headers={"Host": host}).status_code == 200, host
        # Another site's page: 403; the server's own pages and listed origins are served, the latter with CORS.
        r = post(json=ok, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert post(json=ok, headers={"Origin": "null"}).status_code == 403
        assert post(json=ok, headers={"Origin": server.url}).status_code == 200
        r = post(json=ok, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        pre = httpx.options(server.url + C, timeout=TIMEOUT, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        bad_pre = httpx.options(server.url + C, timeout=TIMEOUT, headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert bad_pre.status_code == 403 and "access-control-allow-origin" not in bad_pre.headers


def test_default_server_accepts_only_its_own_origin_and_loopback_hosts(randomly):
    with ThreadServer(randomly, model="r") as server:
        r = httpx.post(server.url + C, json={"prompt": "hi", "max_tokens": 1}, timeout=TIMEOUT,
                       headers={"Origin": "https://app.example"})
        assert r.status_code == 403
        rebound = httpx.get(server.url + "/health", headers={"Host": "rebound.example"}, timeout=TIMEOUT)
        assert rebound.status_code == 400
        page = httpx.get(server.url + "/web", timeout=TIMEOUT)  # README's address, on a server without --web
        assert page.status_code == 404 and "--web" in page.json()["error"]["message"]


def test_web_page_takes_no_uploads_and_no_unbounded_bodies(randomly):
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e \".[web]\"")
    with ThreadServer(randomly, model="r", web=True, max_body_bytes=1 << 16) as server:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
            for path in ("/web/gradio_api/upload", "/web/upload"):
                r = client.post(path, files={"files": ("a.txt", b"x" * 100)})
                assert r.status_code == 404, (path, r.status_code)
            r = client.post("/web/gradio_api/queue/join", content=b"x" * (1 << 17),
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 413
            r = client.post("/web/gradio_api/queue/join", content=iter([b"{}"]),
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 411
            r = client.get("/web", follow_redirects=False)  # the slash redirect names no host
            assert r.status_code in (301, 307) and r.headers["location"] == "/web/"
            assert "/web/" in r.text  # and says where, for a client that does not follow it (curl without -L)
            assert client.get("/web/").status_code == 200


# --- keys, routes, small things ---------------------------------------------------------------------------


def test_wrong_keys_are_slowed_without_slowing_anyone_else(randomly):
    from llama.serve.api import create_app
    from llama.serve.limits import AUTH_DELAY

    with pytest.raises(ValueError, match="API key is empty"):
        create_app(None, "m", api_key="")
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(None, "m", api_key="  ")
    with ThreadServer(randomly, model="r", api_key="k3y", auth_delay=2.0) as server:
        url = server.url + "/v1/models"
        with ThreadPoolExecutor(8) as pool:
            start = time.monotonic()
            wrong = [pool.submit(httpx.get, url, headers={"Authorization": "Bearer nope"}, timeout=TIMEOUT)
                     for _ in range(6)]
            wait_until(lambda: time.monotonic() - start > 0.1, "the wrong keys to be waiting")
            right = httpx.get(url, headers={"Authorization": "Bearer k3y"}, timeout=TIMEOUT)
            answered_right = time.monotonic() - start
            statuses = [f.result().status_code for f in wrong]
            answered_wrong = time.monotonic() - start
        assert right.status_code == 200 and statuses == [401] * 6
        assert answered_wrong >= 2.0  # each wrong key waited its delay ...
        assert answered_right < 2.0  # ... while the right one, sent meanwhile, was answered at once
    assert AUTH_DELAY > 0


def test_head_health_and_no_host_built_redirects(randomly):
    with ThreadServer(randomly, model="r") as server:
        r = httpx.head(server.url + "/health", timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == b""
        r = httpx.get(server.url + "/v1/models/", timeout=TIMEOUT, headers={"Host": "localhost"})
        assert "location" not in r.headers and r.status_code in (404, 400)


# --- connections ---------------------------------------------------------------------------------------


def _connect(server: ThreadServer) -> socket.socket:
    host, port = server.url[len("http://"):].split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


def _closed(sock: socket.socket) -> bool:
    """Read until the server closes the connection (True) or TIMEOUT passes."""
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_slow_headers_slow_bodies_and_too_many_connections(randomly):
    config = {"header_timeout": 0.5}
    with ThreadServer(randomly, model="r", config=config, body_timeout=0.5) as server:
        # Slowloris: a header line now and then never finishes the head; the server hangs up.
        with _connect(server) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.settimeout(0.1)
            start, closed = time.monotonic(), False
            while not closed and time.monotonic() - start < TIMEOUT:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")  # another header line every 0.1 s: the head never ends
                    closed = slow.recv(4096) == b""
                except socket.timeout:
                    pass
                except OSError:  # reset, broken pipe: the server hung up
                    closed = True
            assert closed and time.monotonic() - start < 5, "the server kept a never-ending request head open"
        # A body that stops arriving: 408.
        with _connect(server) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\"")
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    # Idle connections count: beyond max_connections the next one is refused with 503 at once.
    with ThreadServer(randomly, model="r", config={"max_connections": 4}) as server:
        idle = [_connect(server) for _ in range(4)]
        try:
            wait_until(lambda: len(server.server.server_state.connections) >= 4, "the idle connections")
            with _connect(server) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200,
                   "the server to serve again once the idle connections closed", every=0.1)


def test_accept_errors_are_logged_at_a_bounded_rate(caplog):
    """Out of file descriptors, asyncio reports every failing accept; one line per interval gets logged."""
    import errno

    from llama.serve.connections import quiet_accept_errors

    async def flood() -> None:
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop, every=60)
        for _ in range(5000):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(errno.EMFILE, "Too many open files")})
        loop.call_exception_handler({"message": "something else", "exception": ValueError("other")})

    with caplog.at_level(logging.ERROR):
        asyncio.run(flood())
    accept_lines = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(accept_lines) == 1 and "Too many open files" in accept_lines[0].getMessage()
    assert any("something else" in r.getMessage() for r in caplog.records)  # other reports still go through


def test_running_out_of_file_descriptors_logs_little_and_recovers():
    """A real server whose open-file limit is lowered while it runs: connections beyond it fail to be
    accepted, which is logged once (not once per failing accept, with a traceback), and once they are closed
    it serves again."""
    resource = pytest.importorskip("resource")
    server = ProcessServer([*demo_paths(), "--max_seq_len", "64", "--max_batch_size", "1"])
    clients: List[socket.socket] = []
    try:
        fds = len(list((__import__("pathlib").Path("/proc") / str(server.pid) / "fd").iterdir()))
        try:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (fds + 4, fds + 4))
        except (OSError, AttributeError) as err:
            pytest.skip(f"cannot lower another process's open-file limit here: {err}")
        host, port = server.url[len("http://"):].split(":")
        start = time.monotonic()
        # 12 connections more than the limit: asyncio's accept fails on each retry (one a second) until they close;
        # it then takes them a few per retry (the limit's worth), so each one beyond it is ~0.25 s of recovery.
        for _ in range(16):
            clients.append(socket.create_connection((host, int(port)), timeout=TIMEOUT))
        server.wait_for("cannot accept connections: .*Too many open files")
        time.sleep(2)  # asyncio retries the accept every second meanwhile: those failures must stay quiet
        for sock in clients:
            sock.close()
        clients.clear()
        wait_until(lambda: httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200,
                   "the server to serve again", every=0.2)
        assert server.terminate() == 0
        output = server.text()
        lines = output.count("cannot accept connections")  # one per ACCEPT_LOG_EVERY (10 s) at most
        assert 1 <= lines <= 1 + (time.monotonic() - start) // 10, output[-3000:]
        assert "out of system resource" not in output and "Traceback" not in output, output[-3000:]
        # One log line per request, the app's (with its ID, status and time); uvicorn's access log is off.
        assert re.search(r"request \w+: GET /health -> 200 in \d+\.\d+ s", output), output[-3000:]
        assert '"GET /health HTTP/1.1"' not in output, output[-3000:]
    finally:
        for sock in clients:
            sock.close()
        server.kill()


# --- the command line ------------------------------------------------------------------------------------


def test_cli_refuses_empty_keys_abbreviations_and_names_a_taken_port(capsys, monkeypatch):
    """The command line's own checks, before any model is loaded (main() in this process)."""
    from llama.programs.serve import main

    assert main([*demo_paths(), "--api-key", ""]) == 2
    assert "API key is empty" in capsys.readouterr().err
    monkeypatch.setenv("LLAMA_API_KEY", " ")
    assert main(demo_paths()) == 2
    assert "API key is empty" in capsys.readouterr().err
    monkeypatch.delenv("LLAMA_API_KEY")
    with pytest.raises(SystemExit) as exit_:
        main([*demo_paths(), "--max_batch", "2"])  # an abbreviation of --max_batch_size
    assert exit_.value.code == 2 and "unknown flag --max_batch; did you mean --max_batch_size?" in capsys.readouterr().err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        assert main([*demo_paths(), "--port", str(port)]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
    assert main([*demo_paths(), "--max_prefill_tokens", "-1"]) == 2
    assert "--max_prefill_tokens" in capsys.readouterr().err


def test_cli_default_prefill_budget():
    from llama.programs.serve import parse_args
    from llama.serve.limits import MAX_PREFILL_TOKENS

    assert parse_args([]).max_prefill_tokens == MAX_PREFILL_TOKENS == 512


@pytest.fixture(scope="module")
def long_loop(tmp_path_factory):
    """A scripted checkpoint answering 'Hello world world ...' forever."""
    return scripted_checkpoint(tmp_path_factory.mktemp("loop"), {None: [HELLO, WORLD, WORLD]})


def test_sigterm_drain_timeout_ends_every_request_with_a_last_event(long_loop):
    server = ProcessServer(["--ckpt_dir", str(long_loop), "--tokenizer_path", str(TOKENIZER), "--max_seq_len",
                            "8192", "--max_batch_size", "2", "--dtype", "float32", "--model", "loop",
                            "--drain_timeout", "0.5"])
    try:
        body = {"model": "loop", "prompt": "x", "max_tokens": 8000, "temperature": 0}
        lines: List[str] = []
        first = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", server.url + C, json={**body, "stream": True}, timeout=TIMEOUT) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        with ThreadPoolExecutor(2) as pool:
            streaming = pool.submit(stream)
            whole = pool.submit(httpx.post, server.url + C, json=body, timeout=TIMEOUT)
            assert first.wait(TIMEOUT)
            wait_until(lambda: httpx.get(server.url + "/health", timeout=TIMEOUT).json()["running"] == 2,
                       "both requests to run")
            rc = server.terminate()
            streaming.result(TIMEOUT)
            answer = whole.result(TIMEOUT)
        assert rc == 0, server.text()
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
        assert text.startswith(" Hello world") and len(text) < len(" Hello" + " world" * 7999)  # cut short
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutdown", answer.text
        assert "drain_timeout" in answer.json()["error"]["message"]
    finally:
        server.kill()


FAILING = r'''
import sys
from llama.programs import serve as main
from llama.engine import runner

calls = {"n": 0}
execute = runner.execute


def broken(decode, plan):
    if plan.decode_tokens is not None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the accelerator fell off the bus")
    return execute(decode, plan)


runner.execute = broken
sys.exit(main.main(sys.argv[1:]))
'''


def test_an_engine_failure_says_failed_and_exits_non_zero(tmp_path, long_loop):
    script = tmp_path / "failing_server.py"
    script.write_text(FAILING)
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), "--ckpt_dir", str(long_loop), "--tokenizer_path",
                             str(TOKENIZER), "--max_seq_len", "256", "--dtype", "float32", "--port", "0",
                             "--model", "loop"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("Serving"):
                url = line.split(" on ")[1].split(" ")[0]
                break
        assert url, "the server did not start"
        r = httpx.post(url + C, json={"model": "loop", "prompt": "x", "max_tokens": 50, "temperature": 0},
                       timeout=TIMEOUT)
        assert r.status_code == 500 and "fell off the bus" in r.json()["error"]["message"]
        assert proc.wait(TIMEOUT) == 1
        output = proc.stdout.read()
        assert "engine failure" in output and "fell off the bus" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
