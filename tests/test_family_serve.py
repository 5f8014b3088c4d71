"""The server with other families: Code Llama's `suffix` (fill in the middle, OpenAI's legacy completions
field) and a --shield that refuses what Llama Guard rates unsafe; with a real client (httpx) on 127.0.0.1."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")
pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e \".[serve]\"")

from helpers import MHA, TOKENIZER, codellama_tokenizer, make_checkpoint  # noqa: E402
from llama import Llama, ModelArgs, Moderation  # noqa: E402
from llama.families.codellama import infilling_prompt  # noqa: E402
from serve_support import TIMEOUT, ThreadServer  # noqa: E402

CODE = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32016, multiple_of=32, rope_theta=1e6)
C, CC = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def code_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codellama")
    ckpt = make_checkpoint(folder / "ckpt", CODE)
    return Llama.build(str(ckpt), str(codellama_tokenizer(folder)), max_seq_len=128, max_batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("llama2") / "ckpt", MHA)
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=128, max_batch_size=2, device="cpu")


def test_suffix_fills_in_the_middle(code_llama):
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    with ThreadServer(code_llama, model="code") as server:
        r = httpx.post(server.url + C, json={"model": "code", "prompt": prefix, "suffix": suffix, "max_tokens": 4,
                                             "temperature": 0}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(infilling_prompt(code_llama.tokenizer, prefix, suffix))


def test_suffix_needs_code_llama(llama2):
    with ThreadServer(llama2, model="l2") as server:
        r = httpx.post(server.url + C, json={"model": "l2", "prompt": "a", "suffix": "b"}, timeout=TIMEOUT)
        ok = httpx.post(server.url + C, json={"model": "l2", "prompt": "a", "suffix": "", "max_tokens": 1},
                        timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert "Code Llama" in r.json()["error"]["message"] and ok.status_code == 200


class FakeGuard:
    """Stands in for a Llama Guard model: rates a conversation unsafe when its last turn holds 'bomb'."""

    def __init__(self) -> None:
        self.seen = []

    def moderate(self, dialog):
        self.seen.append(dialog)
        if "bomb" in dialog[-1]["content"]:
            return Moderation("unsafe", ["S9"], ["Indiscriminate Weapons"])
        return Moderation("safe")


def test_shield_refuses_unsafe_messages_and_checks_answers(llama2):
    guard = FakeGuard()
    with ThreadServer(llama2, model="l2", shield=guard) as server:
        bad = httpx.post(server.url + CC, json={"model": "l2", "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "build a bomb"}]}, timeout=TIMEOUT)
        good = httpx.post(server.url + CC, json={"model": "l2", "max_tokens": 3, "messages": [
            {"role": "user", "content": "hello"}]}, timeout=TIMEOUT)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "content_filter"
    assert "S9 (Indiscriminate Weapons)" in bad.json()["error"]["message"]
    assert guard.seen[0] == [{"role": "user", "content": "build a bomb"}]  # the system prompt is not rated
    assert good.status_code == 200
    answer = good.json()["choices"][0]["message"]["content"]
    assert guard.seen[-1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]
