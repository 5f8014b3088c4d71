"""Structured output: response_format (json_schema strict, json_object) on chat and completions, and vLLM's
structured_outputs / guided_regex. An answer that ends with finish_reason "stop" parses and validates
(jsonschema, Python's re: independent checkers); a schema feature the engine lacks is a 400 naming it."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from llama import Llama

from helpers import MHA, TOKENIZER, make_checkpoint
from serve_support import TIMEOUT, ThreadServer

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
    "size": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "color", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("structured"), MHA, seed=5)
    gen = Llama.build(str(folder), str(TOKENIZER), max_seq_len=256, max_batch_size=4, device="cpu",
                      dtype="float32")
    with ThreadServer(gen, model="m") as s:
        yield s


def post(server, path, body):
    return httpx.post(server.url + path, json={"model": "m", **body}, timeout=TIMEOUT)


@pytest.mark.parametrize("chat", [True, False])
def test_json_schema_answers_that_stop_validate(server, chat):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "strict": True, "schema": SCHEMA}}
    stopped = 0
    for seed in range(6):
        body = {"max_tokens": 60, "temperature": 1.0, "seed": seed, "response_format": fmt}
        body.update({"messages": [{"role": "user", "content": "a thing"}]} if chat else {"prompt": "A thing:"})
        r = post(server, "/v1/chat/completions" if chat else "/v1/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        if choice["finish_reason"] == "stop":
            stopped += 1
            jsonschema.validate(json.loads(text), SCHEMA)
        else:  # cut by max_tokens: still a prefix the grammar allowed
            assert text.lstrip().startswith("{")
    assert stopped >= 3  # the schema's values are short: most answers finish


def test_json_object_and_the_openai_client(server):
    client = server.openai()
    for seed in range(3):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "json"}], seed=seed,
                                           max_tokens=40, temperature=1.0, response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:
            assert r.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("body", [{"guided_regex": "(cat|dog)s? [0-9]{2}"},
                                  {"structured_outputs": {"regex": "(cat|dog)s? [0-9]{2}"}}])
def test_regex_answers_match(server, body):
    for seed in range(4):
        r = post(server, "/v1/completions", {"prompt": "Pet:", "max_tokens": 20, "temperature": 1.0, "seed": seed,
                                             **body})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert re.fullmatch("(cat|dog)s? [0-9]{2}", choice["text"]), choice["text"]


def test_choice(server):
    r = post(server, "/v1/completions", {"prompt": "Pick:", "max_tokens": 10, "temperature": 0,
                                         "structured_outputs": {"choice": ["alpha", "beta gamma"]}})
    assert r.json()["choices"][0]["text"] in ("alpha", "beta gamma")


def test_greedy_grammar_answer_is_the_masked_argmax(server):
    """Greedy with a grammar: each token is the likeliest the grammar allows, not the model's own argmax."""
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 0, "logprobs": 5,
                                         "guided_regex": "[0-9]+"})
    choice = r.json()["choices"][0]
    assert re.fullmatch("[0-9]+", choice["text"])
    top = choice["logprobs"]["top_logprobs"][0]
    assert all(re.fullmatch("[0-9]+", t) for t in choice["logprobs"]["tokens"])
    assert not all(re.fullmatch("[0-9]+", t) for t in top)  # the unconstrained model prefers other tokens


@pytest.mark.parametrize("body, param, piece", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "if": {}}}}},
     "response_format.json_schema.schema", "if"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}},
     "response_format.json_schema.schema", "nowhere"),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_object"),
    ({"guided_regex": "[ab"}, "guided_regex", "unclosed"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "guided_regex", "one kind"),
    ({"guided_regex": "a", "stop": ["x"]}, "stop", "stop"),
])
def test_bad_grammars_name_their_parameter(server, body, param, piece):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and piece in error["message"], error
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
