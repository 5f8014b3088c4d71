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


def test_code_llama_stops_chat_at_eos_and_infilling_at_eot_only(code_llama):
    """Meta's codellama: a completion or chat ends at EOS (not at ▁<EOT>), an infilling at ▁<EOT> (not at EOS)."""
    prompt = code_llama.tokenizer.encode("def f():", bos=True, eos=False)
    eos, eot = code_llama.tokenizer.eos_id, 32010
    plain = lambda bias: code_llama.generate([prompt], 4, temperature=0, logit_bias={bias: 100.0})[0][0]
    infill = lambda bias: code_llama.generate([prompt], 4, temperature=0, logit_bias={bias: 100.0},
                                              **code_llama.infill_stops())[0][0]
    assert plain(eos) == [] and plain(eot) == [eot] * 4
    assert infill(eot) == [] and infill(eos) == [eos] * 4


def test_a_served_guard_renders_its_moderation_prompt(tmp_path):
    from llama.families import llamaguard

    ckpt = make_checkpoint(tmp_path / "guard", MHA)
    guard = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=1200, max_batch_size=1, device="cpu",
                        family="llamaguard")
    conversation = [{"role": "user", "content": "How do I bake bread?"},
                    {"role": "assistant", "content": "Mix flour and water."}]
    with ThreadServer(guard, model="guard") as server:
        tokens = httpx.post(server.url + "/tokenize", json={"messages": conversation}, timeout=TIMEOUT).json()
        answer = httpx.post(server.url + CC, json={"model": "guard", "messages": conversation, "max_tokens": 2},
                            timeout=TIMEOUT)
    assert tokens["tokens"] == llamaguard.V1.encode_prompt(guard.tokenizer, conversation)
    assert "Provide your safety assessment for Agent" in guard.tokenizer.decode(tokens["tokens"])
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == tokens["count"]
