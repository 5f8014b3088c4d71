"""The HTTP server with real clients on 127.0.0.1: the openai client, httpx, raw sockets, and the CLI.

Servers run in a thread of this process (uvicorn over the engine) or as `python -m llama.serve` subprocesses
(SIGTERM drain, torchrun). Every wait is bounded; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e \".[serve]\"")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e \".[serve]\"")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e \".[test]\"")

from helpers import MHA, TOKENIZER, make_checkpoint  # noqa: E402
from llama import Llama  # noqa: E402
from llama.families.chat_format import UNSAFE_ERROR  # noqa: E402
from llama.serve.limits import AUTH_DELAY  # noqa: E402
from serve_support import (DEMO, TIMEOUT, ProcessServer, ThreadServer, demo_paths, noticed,  # noqa: E402
                           ports_refuse, wait_until)
from test_streaming import HELLO, WORLD, scripted_checkpoint  # noqa: E402

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a fortune 🙂"}]


@pytest.fixture(scope="module")
def demo() -> Llama:
    return Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256, max_batch_size=8, device="cpu",
                       dtype="float32")


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("random"), MHA, seed=7)


@pytest.fixture(scope="module")
def randomly(random_dir) -> Llama:
    return Llama.build(str(random_dir), str(TOKENIZER), max_seq_len=128, max_batch_size=4, device="cpu",
                       dtype="float32")


@pytest.fixture(scope="module")
def loop_dir(tmp_path_factory):
    """A scripted checkpoint that answers anything with 'Hello world world world ...', never ending."""
    return scripted_checkpoint(tmp_path_factory.mktemp("loop"), {None: [HELLO, WORLD, WORLD]})


@pytest.fixture(scope="module")
def looping(loop_dir) -> Llama:
    return Llama.build(str(loop_dir), str(TOKENIZER), max_seq_len=1024, max_batch_size=1, device="cpu",
                       dtype="float32")


def loop_text(n: int) -> str:
    """A completion's text after n scripted tokens: it continues the prompt, so " Hello" keeps its space."""
    return " Hello" + " world" * (n - 1)


def continuation(generator: Llama, prompt: str, max_gen_len: int) -> str:
    """The text a completion must have: the tokenizer's decode of prompt + answer tokens (the library's greedy
    answer), minus the prompt's own decode. Decoding the answer's tokens alone would drop its first space."""
    tokens = generator.tokenizer.encode(prompt, bos=True, eos=False)
    answer = generator.generate([tokens], max_gen_len, temperature=0)[0][0]
    whole, head = generator.tokenizer.decode(tokens + answer), generator.tokenizer.decode(tokens)
    assert whole.startswith(head) and head == prompt
    return whole[len(head):]


def stream_chat(client, model: str, messages, **kwargs):
    """(joined text, finish_reason, usage) of a streamed chat completion."""
    parts, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage


# --- the openai client ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["demo", "random"])
def test_openai_client_streams_what_it_gets_whole(request, which):
    generator = request.getfixturevalue("demo" if which == "demo" else "randomly")
    with ThreadServer(generator, model=which) as server:
        client = server.openai()
        assert [m.id for m in client.models.list()] == [which]
        whole = client.chat.completions.create(model=which, messages=CHAT, temperature=0, max_tokens=40)
        text, finish, usage = stream_chat(client, which, CHAT, temperature=0, max_tokens=40)
        assert whole.choices[0].message.role == "assistant"
        assert text == whole.choices[0].message.content and text
        assert finish == whole.choices[0].finish_reason
        assert usage.completion_tokens == whole.usage.completion_tokens
        assert usage.prompt_tokens == whole.usage.prompt_tokens == generator.dialog_length(CHAT)
        reference = generator.chat_completion([CHAT], temperature=0, max_gen_len=40)[0]["generation"]["content"]
        server.wait_idle()
        assert text == reference  # the library's own answer
        prompt = "Once upon a time, 世界"
        whole = client.completions.create(model=which, prompt=prompt, temperature=0, max_tokens=30)
        parts = [c.choices[0].text for c in client.completions.create(model=which, prompt=prompt, temperature=0,
                                                                      max_tokens=30, stream=True) if c.choices]
        assert "".join(parts) == whole.choices[0].text
        assert whole.choices[0].text == continuation(generator, prompt, 30)


def test_parameters_seed_stop_logprobs_and_echo(looping, randomly):
    with ThreadServer(looping, model="loop") as server:
        client = server.openai()
        r = client.completions.create(model="loop", prompt="x", max_tokens=8, stop=["d w", "zz"], temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (" Hello worl", "stop")
        r = client.completions.create(model="loop", prompt="x", max_tokens=3, echo=True, temperature=0)
        assert r.choices[0].text == "x" + loop_text(3) and r.choices[0].finish_reason == "length"
        r = client.chat.completions.create(model="loop", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2)
        content = r.choices[0].logprobs.content
        assert [c.token for c in content] == [" Hello", " world", " world"]
        assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    with ThreadServer(randomly, model="random") as server:
        client = server.openai()
        seeded = [client.completions.create(model="random", prompt="Hi", max_tokens=20, temperature=1.0, seed=s)
                  .choices[0].text for s in (3, 3, 4)]
        assert seeded[0] == seeded[1] != seeded[2]
        r = client.completions.create(model="random", prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
        assert len(r.choices[0].logprobs.token_logprobs) == 4


# --- many clients at once ---------------------------------------------------------------------------------

WORDS = "the fool and his money are soon parted but a wise man knows when to hold his tongue".split()


def test_32_concurrent_clients_share_8_rows_and_each_gets_its_own_answer(demo):
    """Ragged prompts and lengths, half streamed: every answer equals the one the request gets alone."""
    prompts = [" ".join(WORDS[i % 7:(i % 7) + 1 + (i * 5) % 11]) + f" #{i}" for i in range(32)]
    lengths = [8 + (i * 7) % 25 for i in range(32)]
    with ThreadServer(demo, model="demo", max_queue=32) as server:
        client = server.openai()

        def ask(i: int) -> str:
            if i % 2:
                return "".join(c.choices[0].text for c in client.completions.create(
                    model="demo", prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True)
                    if c.choices)
            return client.completions.create(model="demo", prompt=prompts[i], max_tokens=lengths[i],
                                             temperature=0).choices[0].text

        alone = [ask(i) for i in range(32)]
        steps_alone = server.engine.steps
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, range(32), timeout=TIMEOUT))
        steps_together = server.engine.steps - steps_alone
        server.wait_idle()
    assert together == alone
    assert len(set(alone)) > 16  # the answers differ, so a mix-up would show
    assert steps_together < steps_alone / 3  # the requests really shared steps


def test_a_client_that_disconnects_frees_its_row(looping):
    with ThreadServer(looping, model="loop") as server:
        client = server.openai()
        body = {"model": "loop", "prompt": "x", "max_tokens": 1000, "temperature": 0}
        server.gate.allow(1)  # after its first step the engine pauses: the request runs when we leave
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                          timeout=TIMEOUT) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        noticed(server, 1)
        server.gate.allow(None)
        server.wait_idle()
        assert server.engine.finished == {"stop": 0, "length": 0, "cancelled": 1, "abort": 0, "error": 0}
        # The same for a request that is not streamed: its socket is closed while it runs.
        server.gate.allow(1)
        host, port = server.url[len("http://"):].split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            payload = json.dumps(body).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            assert server.engine.wait_until_running(1, TIMEOUT)
        noticed(server, 2)
        server.gate.allow(None)
        server.wait_idle()
        assert server.engine.finished["cancelled"] == 2
        # The freed row (the only one) serves the next request.
        r = client.completions.create(model="loop", prompt="y", max_tokens=3, temperature=0)
        assert r.choices[0].text == loop_text(3)
        assert server.engine.finished == {"stop": 0, "length": 1, "cancelled": 2, "abort": 0, "error": 0}


def test_queue_full_is_429_with_retry_after(looping):
    with ThreadServer(looping, model="loop", max_queue=0) as server:
        body = {"model": "loop", "prompt": "x", "max_tokens": 1000, "stream": True}
        server.gate.allow(1)  # the first request keeps the only row while the others arrive
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
            lines = response.iter_lines()  # kept: a discarded iterator would close the connection
            assert next(lines).startswith("data: ")
            busy = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                server.openai().completions.create(model="loop", prompt="x", max_tokens=2)
            server.gate.allow(None)
        server.wait_idle()
        r = server.openai().completions.create(model="loop", prompt="x", max_tokens=2, temperature=0)
        assert r.choices[0].text == loop_text(2)


# --- bad input --------------------------------------------------------------------------------------------

C, CC = "/v1/completions", "/v1/chat/completions"
OK_CHAT = [{"role": "user", "content": "hi"}]
BAD = {  # name: (path, body (a dict, or raw bytes), status, param, code, a piece of the message)
    "invalid-json": (C, b'{"prompt": "hi",', 400, None, "invalid_json", "not valid JSON"),
    "not-an-object": (C, b'["hi"]', 400, None, "invalid_json", "JSON object"),
    "nan": (C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "invalid_type", "number"),
    "deep-nesting": (C, b"[" * 60000, 400, None, "invalid_json", "not valid JSON"),
    "not-utf8": (C, b'{"prompt": "\xff"}', 400, None, "invalid_json", "not valid JSON"),
    "prompt-type": (C, {"prompt": 5}, 400, "prompt", "invalid_type", "prompt"),
    "prompt-missing": (C, {}, 400, "prompt", None, "prompt"),
    "prompt-mixed": (C, {"prompt": ["a", [1, 2]]}, 400, "prompt", "invalid_type", "mixes"),
    "token-ids": (C, {"prompt": [1, 99999999]}, 400, "prompt", None, "outside"),
    "temperature-type": (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "invalid_type", "number"),
    "max-tokens-type": (C, {"prompt": "hi", "max_tokens": "9"}, 400, "max_tokens", "invalid_type", "integer"),
    "max-tokens-float": (C, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", "invalid_type", "integer"),
    "stream-type": (C, {"prompt": "hi", "stream": "yes"}, 400, "stream", "invalid_type", "boolean"),
    "stop-type": (C, {"prompt": "hi", "stop": [1]}, 400, "stop", "invalid_type", "stop"),
    "too-many-stops": (C, {"prompt": "hi", "stop": list("abcde")}, 400, "stop", None, "up to 4"),
    "seed-type": (C, {"prompt": "hi", "seed": "1"}, 400, "seed", "invalid_type", "integer"),
    "prompt-too-long": (C, {"prompt": "hello " * 200}, 400, "prompt", "context_length_exceeded", "max_seq_len"),
    "max-tokens-0": (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None, ">= 1"),
    "max-tokens-huge": (C, {"prompt": "hi", "max_tokens": 10 ** 6}, 400, "max_tokens", "context_length_exceeded",
                        "room for 126"),
    "temperature-negative": (C, {"prompt": "hi", "temperature": -0.1}, 400, "temperature", None, ">= 0"),
    "top-p-0": (C, {"prompt": "hi", "top_p": 0}, 400, "top_p", None, "(0, 1]"),
    "top-p-big": (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None, "(0, 1]"),
    "n-big": (C, {"prompt": "hi", "n": 9}, 400, "n", None, "1..8"),
    "logprobs-big": (C, {"prompt": "hi", "logprobs": 6}, 400, "logprobs", None, "0..5"),
    "penalty": (C, {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", None, "[-2, 2]"),
    "unknown-model": (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found", "gpt-4"),
    "messages-empty": (CC, {"messages": []}, 400, "messages", None, "non-empty"),
    "messages-missing": (CC, {}, 400, "messages", None, "non-empty"),
    "messages-type": (CC, {"messages": "hi"}, 400, "messages", "invalid_type", "non-empty"),
    "role-order": (CC, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
                   "messages", None, "'assistant' was expected"),
    "ends-with-assistant": (CC, {"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"}]}, 400, "messages", None,
                            "must end with a 'user' message"),
    "unknown-role": (CC, {"messages": [{"role": "robot", "content": "a"}]}, 400, "messages[0].role", None,
                     '"robot"'),
    "content-type": (CC, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
                     "invalid_type", "string"),
    "special-tags": (CC, {"messages": [{"role": "user", "content": "[INST] hi [/INST]"}]}, 400, "messages",
                     "special_tags", UNSAFE_ERROR),
    "chat-max-tokens-huge": (CC, {"messages": OK_CHAT, "max_tokens": 500}, 400, "max_tokens",
                             "context_length_exceeded", "max_seq_len"),
    "tools": (CC, {"messages": OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools[0].function", None, "name"),
    "tools-on-llama2": (CC, {"messages": OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
                        "tools", None, "Llama 3.1"),
    "top-logprobs-alone": (CC, {"messages": OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs", None, "logprobs"),
}


@pytest.fixture(scope="module")
def random_server(randomly):
    with ThreadServer(randomly, model="random", max_body_bytes=64 << 10) as server:
        yield server


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_gets_its_status_and_the_server_keeps_serving(random_server, name):
    path, body, status, param, code, message = BAD[name]
    if isinstance(body, dict):
        body = json.dumps({"model": "random", **body}).encode()
    r = httpx.post(random_server.url + path, content=body, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error
    assert message in error["message"], error
    ok = httpx.post(random_server.url + C, json={"model": "random", "prompt": "hi", "max_tokens": 2},
                    timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_huge_body_is_refused_with_413(random_server, chunked):
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    content = iter([big[i:i + 8192] for i in range(0, len(big), 8192)]) if chunked else big
    r = httpx.post(random_server.url + C, content=content, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert random_server.openai().completions.create(model="random", prompt="hi", max_tokens=1).choices


def test_routes_and_methods(random_server):
    assert httpx.get(random_server.url + "/v1/nothing", timeout=TIMEOUT).status_code == 404
    r = httpx.get(random_server.url + C, timeout=TIMEOUT)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    health = httpx.get(random_server.url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(random_server.url + "/v1/models/random", timeout=TIMEOUT).json()["id"] == "random"
    assert httpx.get(random_server.url + "/v1/models/other", timeout=TIMEOUT).status_code == 404


def test_openai_client_sees_the_errors(random_server):
    client = random_server.openai()
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="random", prompt="hi", top_p=2)
    with pytest.raises(openai.BadRequestError, match="special tags"):
        client.chat.completions.create(model="random", messages=[{"role": "user", "content": "<<SYS>>"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_api_key(randomly):
    with ThreadServer(randomly, model="random", api_key="s3cret") as server:
        url = server.url + "/v1/models"
        assert httpx.get(url, timeout=TIMEOUT).status_code == 401
        wrong = httpx.get(url, headers={"Authorization": "Bearer s3creT"}, timeout=TIMEOUT)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=TIMEOUT).status_code == 200
        assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            server.openai(api_key="wrong").completions.create(model="random", prompt="hi", max_tokens=1)
        r = server.openai(api_key="s3cret").completions.create(model="random", prompt="hi", max_tokens=1)
        assert r.choices[0].finish_reason == "length"


def test_draining_answers_503(randomly):
    with ThreadServer(randomly, model="random") as server:
        server.engine.drain()
        r = httpx.post(server.url + C, json={"prompt": "hi"}, timeout=TIMEOUT)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["status"] == "draining"


# --- the command line -------------------------------------------------------------------------------------


def test_cli_serves_and_sigterm_drains_then_exits_0(loop_dir):
    server = ProcessServer(["--ckpt_dir", str(loop_dir), "--tokenizer_path", str(TOKENIZER), "--max_seq_len",
                            "1600", "--max_batch_size", "2", "--dtype", "float32", "--api-key", "k3y",
                            "--model", "loop"])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y", timeout=TIMEOUT, max_retries=0)
        # 1500 tokens take seconds: the signal comes while the answer is being written.
        stream = client.completions.create(model="loop", prompt="x", max_tokens=1500, temperature=0, stream=True)
        parts = [next(stream).choices[0].text]
        status: Dict[str, int] = {}
        stopper = threading.Thread(target=lambda: status.setdefault("rc", server.terminate()))
        stopper.start()
        server.wait_for("Shutting down")  # uvicorn took the signal while the answer streams
        wait_until(lambda: ports_refuse(server.url), "the port to close to new connections")
        finish = None
        for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        stopper.join(TIMEOUT)
        assert "".join(parts) == loop_text(1500) and finish == "length"  # the running request was drained
        assert status["rc"] == 0, server.text()
        assert "Server stopped." in server.text()
        assert ports_refuse(server.url)
    finally:
        server.kill()


def test_cli_usage_errors_exit_2(tmp_path):
    from helpers import run_program

    run = lambda *args: run_program("-m", "llama.serve", *args, timeout=TIMEOUT)  # noqa: E731
    missing = run("--ckpt_dir", str(tmp_path))
    assert missing.returncode == 2 and "--tokenizer_path is missing" in missing.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken = run(*demo_paths(), "--port", str(busy.getsockname()[1]))
    busy.close()
    assert taken.returncode == 2 and "error:" in taken.stderr and "Loading" not in taken.stdout


def test_model_parallel_server_under_torchrun(demo):
    """torchrun --nproc_per_node 2 -m llama.serve: rank 0 serves, rank 1 follows; SIGTERM to rank 0 ends both."""
    server = ProcessServer([*demo_paths(), "--max_seq_len", "256", "--max_batch_size", "4", "--dtype", "float32",
                            "--model", "demo"], nproc=2)
    prompts = ["The fool", "A wise man knows when to", "世界😀 and", "a b c d e f g h"]
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        whole = client.chat.completions.create(model="demo", messages=CHAT, temperature=0, max_tokens=30)
        text, finish, _ = stream_chat(client, "demo", CHAT, temperature=0, max_tokens=30)
        assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda p: client.completions.create(
                model="demo", prompt=p, temperature=0, max_tokens=20).choices[0].text, prompts, timeout=TIMEOUT))
        assert server.terminate() == 0, server.text()
    finally:
        server.kill()
    expected = [continuation(demo, p, 20) for p in prompts]
    assert together == expected
    assert text == demo.chat_completion([CHAT], temperature=0, max_gen_len=30)[0]["generation"]["content"]


def test_the_listening_socket_is_tcp_so_chunks_are_not_delayed():
    """asyncio disables Nagle only on sockets that say they are TCP; otherwise every streamed chunk after a
    connection's first response waits for the client's delayed ACK (about 40 ms)."""
    from llama.programs.serve import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname()[:2], timeout=TIMEOUT)
        accepted, _ = sock.accept()
        assert accepted.proto == socket.IPPROTO_TCP
        accepted.close()
        client.close()
    finally:
        sock.close()


def test_web_page_asks_for_the_api_key(randomly):
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e \".[web]\"")
    with ThreadServer(randomly, model="random", api_key="k3y", web=True) as server:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
            assert client.get("/web/config").status_code == 401
            start = time.monotonic()
            assert client.post("/web/login", data={"username": "me", "password": "k3Y"}).status_code == 400
            assert time.monotonic() - start >= AUTH_DELAY  # a wrong password is slowed like a wrong key
            assert client.post("/web/login", data={"username": "me", "password": "k3y"}).status_code == 200
            assert client.get("/web/config").status_code == 200


def test_cli_serves_a_model_quantized_at_load():
    """--quantize int8 on the server gives what Llama.build(quantize="int8") gives, at temperature 0."""
    quantized = Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256, max_batch_size=2,
                            device="cpu", dtype="bfloat16", quantize="int8")
    want = quantized.chat_completion([CHAT], temperature=0, max_gen_len=24)[0]["generation"]["content"]
    server = ProcessServer([*demo_paths(), "--max_seq_len", "256", "--max_batch_size", "2", "--dtype", "bfloat16",
                            "--quantize", "int8", "--model", "q", "--verbose"])  # --verbose: the kernel line
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        got = client.chat.completions.create(model="q", messages=CHAT, temperature=0, max_tokens=24)
        assert got.choices[0].message.content == want
        assert server.terminate() == 0, server.text()
        log = server.text()
        assert "int8 (quantized at load) weights" in log and "Int8Linear" in log  # the kernels that ran
    finally:
        server.kill()


def test_the_whole_sampling_set_and_n_choices_over_http(demo):
    """Every engine option is accepted (an out-of-range one is a 400 naming it); n=3 seeded choices share one
    request and equal three requests seeded seed, seed+1, seed+2; usage counts every choice's tokens."""
    with ThreadServer(demo, model="m") as server:
        client = server.openai()
        extra = {"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.1, "stop_token_ids": [13]}
        r = client.completions.create(model="m", prompt="Once upon", max_tokens=6, temperature=0.9, seed=7, n=3,
                                      presence_penalty=0.3, frequency_penalty=0.2, logit_bias={"450": 2.0},
                                      extra_body=extra)
        assert [c.index for c in r.choices] == [0, 1, 2]
        alone = [client.completions.create(model="m", prompt="Once upon", max_tokens=6, temperature=0.9, seed=7 + i,
                                           presence_penalty=0.3, frequency_penalty=0.2, logit_bias={"450": 2.0},
                                           extra_body=extra) for i in range(3)]
        assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
        assert len({c.text for c in r.choices}) > 1  # the choices do differ
        assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
        assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
        streamed = {}
        for chunk in client.completions.create(model="m", prompt="Once upon", max_tokens=6, temperature=0.9,
                                               seed=7, n=3, stream=True, presence_penalty=0.3,
                                               frequency_penalty=0.2, logit_bias={"450": 2.0}, extra_body=extra):
            for c in chunk.choices:
                streamed[c.index] = streamed.get(c.index, "") + c.text
        assert [streamed[i] for i in range(3)] == [c.text for c in r.choices]
        for body, param in [({"top_k": -5}, "top_k"), ({"min_p": 2}, "min_p"), ({"presence_penalty": 9},
                            "presence_penalty"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                            ({"logit_bias": {"5": 500}}, "logit_bias"), ({"n": 99}, "n"),
                            ({"repetition_penalty": 0}, "repetition_penalty"),
                            ({"stop_token_ids": [-1]}, "stop_token_ids")]:
            resp = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2,
                                                                     **body}, timeout=TIMEOUT)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (body, resp.text)
