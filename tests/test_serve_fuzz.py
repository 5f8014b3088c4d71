"""A property-based fuzz test of the server: random requests to every endpoint while ordinary streams run.

hypothesis generates the requests (derandomized, so every run sends the same ones, and bounded: a few seconds).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e \".[serve]\"")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e \".[serve]\"")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed: pip install -e \".[test]\"")

from llama import Llama  # noqa: E402
from serve_support import DEMO, TIMEOUT, ThreadServer  # noqa: E402
from test_serve_safety import C, CC, streamed  # noqa: E402

st = hypothesis.strategies


@pytest.fixture(scope="module")
def demo() -> Llama:
    return Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256, max_batch_size=4, device="cpu",
                       dtype="float32")


ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())  # surrogates, NUL
TEXT = st.text(ANY_CHAR, max_size=40) | st.sampled_from(["", "\x00", "\ud800", "[INST]", "<<SYS>>", "a" * 3000])
NUMBER = (st.integers(min_value=-2 ** 70, max_value=2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from([0, 1e-40, 2, 2.0000001, 10 ** 400, -0.0, 5e-324]))
SCALAR = st.none() | st.booleans() | NUMBER | TEXT
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool"]) | JSON,
                                              "content": TEXT | JSON})
FIELDS = {
    "model": st.just("f") | JSON, "prompt": TEXT | st.lists(st.integers(-5, 40000), max_size=6) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON, "max_tokens": st.integers(-2, 8) | NUMBER | JSON,
    "temperature": NUMBER | JSON, "top_p": NUMBER | JSON, "seed": NUMBER | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=5) | JSON, "stream": st.booleans() | JSON, "echo": st.booleans() | JSON,
    "logprobs": st.integers(-1, 25) | st.booleans() | JSON, "top_logprobs": st.integers(-1, 25) | JSON,
    "n": NUMBER | JSON, "stream_options": JSON, "logit_bias": JSON, "user": JSON,
}
BODY = st.fixed_dictionaries({}, optional=FIELDS) | JSON
# Nearly valid bodies, with some fields fuzzed, so that the fuzzing also reaches the engine.
NEAR = {k: FIELDS[k] for k in ("temperature", "top_p", "seed", "stop", "stream", "echo", "logprobs", "n", "user")}
NEARLY = (st.fixed_dictionaries({"prompt": st.text(ANY_CHAR, max_size=20), "max_tokens": st.integers(1, 6)},
                                optional=NEAR)
          | st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
              {"role": st.just("user"), "content": TEXT}), min_size=1, max_size=1), "max_tokens": st.integers(1, 6)},
              optional=NEAR))
VALID_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",)), max_size=30)
VALID = st.fixed_dictionaries({"prompt": VALID_TEXT, "max_tokens": st.integers(1, 6)}, optional={
    "temperature": st.floats(0, 2) | st.sampled_from([1e-40, 5e-324, 2]), "top_p": st.floats(1e-9, 1),
    "seed": st.integers(0, 2 ** 64 - 1), "stop": st.lists(VALID_TEXT, max_size=4), "echo": st.booleans(),
    "stream": st.booleans(), "logprobs": st.integers(0, 5)})


def _encode(body) -> bytes:
    try:
        return json.dumps(body).encode()  # lone surrogates go as \\udXXX escapes, as a hostile client sends them
    except ValueError:
        return b"{"


REQUEST = st.one_of(
    st.tuples(st.sampled_from([C, CC]), st.just("POST"), NEARLY.map(_encode), st.just("application/json")),
    st.tuples(st.just(C), st.just("POST"), VALID.map(_encode), st.just("application/json")),
    st.tuples(st.sampled_from([C, CC]), st.sampled_from(["POST"]), BODY.map(_encode),
              st.sampled_from(["application/json"] * 6 + ["text/plain", "", "application/json; charset=utf-8"])),
    st.tuples(st.sampled_from([C, CC]), st.just("POST"), st.binary(max_size=64), st.just("application/json")),
    st.tuples(st.sampled_from(["/v1/models", "/v1/models/f", "/v1/models/x/y", "/health", "/v1/", C]),
              st.sampled_from(["GET", "HEAD", "DELETE", "OPTIONS"]), st.just(b""), st.just("")),
)
OVERLOAD = {429, 503}  # documented: every row busy and the queue full, or too many connections


def test_fuzzed_requests_never_break_the_server_or_other_streams(demo):
    """Random bodies (wrong types, out-of-range numbers, surrogates and NULs, deep and wide nesting, garbage
    bytes, wrong content types) to every endpoint while ordinary streams run: no 5xx but documented overload,
    every answer OpenAI's JSON, every ordinary stream gets exactly its answer, and afterwards a plain request
    gets the same answer as before."""
    plain = {"model": "f", "prompt": "The fool and his money", "max_tokens": 40, "temperature": 0}
    with ThreadServer(demo, model="f", max_queue=8) as server:
        before = httpx.post(server.url + C, json=plain, timeout=TIMEOUT).json()["choices"][0]["text"]
        stream_body = {**plain, "max_tokens": 120, "prompt": "A wise man knows when to"}
        reference = streamed(server, stream_body)[0]
        done = threading.Event()
        results: List[str] = []

        def keep_streaming() -> None:
            while not done.is_set():
                results.append(streamed(server, stream_body)[0])

        statuses: Dict[int, int] = {}
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client, ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(keep_streaming) for _ in range(2)]

            @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(REQUEST)
            def fuzz(req) -> None:
                path, method, body, content_type = req
                headers = {"Content-Type": content_type} if content_type else {}
                r = client.request(method, path, content=body or None, headers=headers)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500 or r.status_code in OVERLOAD, (req, r.status_code, r.text[:300])
                if method != "HEAD" and r.status_code >= 400:
                    error = r.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"} and error["message"]
                elif r.status_code == 200 and method == "POST" and b'"stream": true' not in body:
                    assert r.json()["choices"]

            try:
                fuzz()
            finally:
                done.set()
                for s in streams:
                    s.result(TIMEOUT)
        after = httpx.post(server.url + C, json=plain, timeout=TIMEOUT).json()["choices"][0]["text"]
        server.wait_idle()
        assert server.engine.failure is None and server.engine.finished["error"] == 0
    assert results and all(r == reference for r in results), "a fuzzed request disturbed a running stream"
    assert after == before
    assert statuses.get(200, 0) > 10 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 50, statuses
