"""Serving LoRA adapters beside the base (llama/serve/lora_routes.py): the openai client names the base or an
adapter by `model`, concurrently, and each answers as the model with that adapter merged would; /v1/models lists
the adapters with the base as parent; unknown models are 404s; load and unload at run time, behind the key."""

from __future__ import annotations

import threading
from typing import Dict

import pytest

from helpers import SHAPES, TOKENIZER, make_checkpoint
from llama import Llama
from llama.checkpoints.checkpoint import random_state
from llama.checkpoints.convert import convert
from serve_support import ThreadServer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("peft")
from test_lora_many import ADAPTERS, make_adapter  # noqa: E402

KEY = "secret-key"
DIALOG = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, object]:
    root = tmp_path_factory.mktemp("serve_loras")
    args = SHAPES["gqa"]
    meta = make_checkpoint(root / "meta", args, 1, state=random_state(args, seed=43))
    hf_dir = convert(meta, root / "hf", tokenizer_path=TOKENIZER)
    paths = {}
    for name in ("a", "b"):
        paths[name] = root / name
        make_adapter(hf_dir, paths[name], *ADAPTERS[name])
    return dict(meta=meta, paths=paths)


def build(ckpt, lora, **kw) -> Llama:
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32",
                       lora=lora, **kw)


@pytest.fixture(scope="module")
def expected(files) -> Dict[object, str]:
    out = {}
    for name in (None, "a", "b"):
        gen = build(files["meta"], None if name is None else str(files["paths"][name]))
        out[name] = gen.chat_completion([DIALOG], temperature=0, max_gen_len=8)[0]["generation"]["content"]
    assert len(set(out.values())) == 3  # the adapters change the answers
    return out


@pytest.fixture(scope="module")
def server(files):
    gen = build(files["meta"], {n: str(p) for n, p in files["paths"].items()}, max_loras=1)
    with ThreadServer(gen, model="base", api_key=KEY, lora_loading=True) as srv:
        yield srv


def ask(client, model: str) -> str:
    out = client.chat.completions.create(model=model, messages=DIALOG, temperature=0, max_tokens=8)
    assert out.model == model
    return out.choices[0].message.content


def test_base_and_two_adapters_concurrently(server, expected):
    """Six concurrent requests over the base and two adapters with one bank slot: the adapter requests wait for
    the slot in turn (none fails), and each answers as its merged model."""
    client = server.openai(api_key=KEY)
    names = ["base", "a", "b", "a", "b", "base"]
    answers: Dict[int, str] = {}
    errors = []

    def run(i: int) -> None:
        try:
            answers[i] = ask(client, names[i])
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i, name in enumerate(names):
        assert answers[i] == expected[None if name == "base" else name]


def test_models_list_and_unknown_model(server):
    client = server.openai(api_key=KEY)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "a", "b"}
    assert cards["a"].parent == "base" and cards["b"].parent == "base"
    assert client.models.retrieve("b").parent == "base"
    with pytest.raises(openai.NotFoundError, match="'nope'"):
        ask(client, "nope")


def test_load_and_unload_at_run_time(server, files, expected):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "/v1"
    assert httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": str(files["paths"]["a"])}
                      ).status_code == 401
    loaded = httpx.post(url + "/load_lora_adapter", headers=headers,
                        json={"lora_name": "a2", "lora_path": str(files["paths"]["a"])})
    assert loaded.status_code == 200, loaded.text
    client = server.openai(api_key=KEY)
    assert ask(client, "a2") == expected["a"]
    bad = httpx.post(url + "/load_lora_adapter", headers=headers,
                     json={"lora_name": "bad", "lora_path": str(files["meta"])})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    gone = httpx.post(url + "/unload_lora_adapter", headers=headers, json={"lora_name": "a2"})
    assert gone.status_code == 200, gone.text
    with pytest.raises(openai.NotFoundError, match="'a2'"):
        ask(client, "a2")
    assert httpx.post(url + "/unload_lora_adapter", headers=headers, json={"lora_name": "a2"}).status_code == 404


def test_loading_is_off_by_default(files):
    gen = build(files["meta"], {"a": str(files["paths"]["a"])})
    with ThreadServer(gen, model="base") as srv:
        import httpx

        reply = httpx.post(srv.url + "/v1/load_lora_adapter",
                           json={"lora_name": "b", "lora_path": str(files["paths"]["b"])})
        assert reply.status_code == 404 and "--enable_lora_loading" in reply.json()["error"]["message"]
        assert ask(srv.openai(), "a") == build(files["meta"], str(files["paths"]["a"])).chat_completion(
            [DIALOG], temperature=0, max_gen_len=8)[0]["generation"]["content"]


def test_serve_flags():
    from llama.programs.serve import _loras, parse_args

    assert _loras(parse_args(["--lora", "one/path"])) == ("one/path", {})
    lora, options = _loras(parse_args(["--lora", "a=x", "b=y", "--max_loras", "1"]))
    assert lora == {"a": "x", "b": "y"} and options["max_loras"] == 1
    for argv, message in [(["--lora", "a=x", "a=y"], "twice"), (["--lora", "a=x", "y"], "NAME=PATH"),
                          (["--lora", "p", "--max_loras", "2"], "NAME=PATH"), (["--max_loras", "2"], "need")]:
        with pytest.raises(ValueError, match=message):
            _loras(parse_args(argv))


def test_a_request_waiting_for_a_slot_does_not_hold_back_those_behind_it(files, expected):
    """One slot, held by a running request of adapter a: a request for b waits for it, and the base request and
    the second request for a behind it start at once (head-of-line); b runs once the slot frees. Each answers as
    its merged model."""
    from llama.engine.events import Chunk, Finished, Request
    from llama.engine.params import SamplingParams
    from llama.serve.scheduler import Scheduler

    gen = build(files["meta"], {n: str(p) for n, p in files["paths"].items()}, max_loras=1)
    scheduler = Scheduler(gen)
    prompt = gen.prompts.encode(DIALOG)
    texts: Dict[int, str] = {i: "" for i in range(4)}
    ends: Dict[int, str] = {}

    def sink(i):
        def take(event) -> None:
            if isinstance(event, Chunk):
                texts[i] += event.text
            elif isinstance(event, Finished):
                ends[i] = event.reason
        return take

    names = ["a", "b", None, "a"]
    requests = [Request(list(prompt), SamplingParams(temperature=0, max_tokens=8), sink(i), id=str(i), lora=name)
                for i, name in enumerate(names)]
    for request in requests:
        scheduler.submit(request)
    scheduler.step()
    running = {r.id for r in scheduler._admitted}
    assert running == {"0", "2", "3"}, running  # b waits; the base and a loaded adapter went past it
    assert [r.id for r in scheduler._waiting] == ["1"]
    for _ in range(100):
        if not scheduler.step():
            break
    assert sorted(ends) == [0, 1, 2, 3] and set(ends.values()) <= {"length", "stop"}, ends
    for i, name in enumerate(names):
        assert texts[i].strip() == expected[name].strip()
