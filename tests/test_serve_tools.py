"""Tool calling and chat templates over the server, with the openai client: a Llama 3.1-shaped checkpoint served
with the published 3.1 template (its /tokenize ids are the template's, checked with transformers' renderer and
tiktoken), named and required tool_choice always giving valid calls (streamed or not), the openai client's own
stream assembly, a full round trip (call, tool result, answer), and 400s naming bad tools."""

from __future__ import annotations

import copy
import json

import pytest

httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")
pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e \".[serve]\"")
pytest.importorskip("llguidance", reason="llguidance is not installed: pip install -e \".[structured]\"")
pytest.importorskip("tiktoken")
jsonschema = pytest.importorskip("jsonschema")
chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

from helpers import LLAMA3_TOKENIZER, LLAMA3_VOCAB, TOKENIZER, llama3_reference, make_checkpoint  # noqa: E402
from llama import Llama, ModelArgs  # noqa: E402
from serve_support import TIMEOUT, ThreadServer  # noqa: E402

LLAMA31 = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=LLAMA3_VOCAB, multiple_of=32,
                    rope_theta=500000.0, use_scaled_rope=True)
TEMPLATE = TOKENIZER.parent / "chat-templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"
CC = "/v1/chat/completions"
DATE = "07 Dec 2026"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama31") / "ckpt", LLAMA31)


@pytest.fixture(scope="module")
def templated(ckpt):
    return Llama.build(str(ckpt), str(LLAMA3_TOKENIZER), max_seq_len=1024, max_batch_size=4, device="cpu",
                       chat_template=str(TEMPLATE))


@pytest.fixture(scope="module")
def server(templated):
    with ThreadServer(templated, model="l31") as server:
        yield server


def reference_ids(messages, tools=None):
    """transformers' rendering of the 3.1 template (tool-call arguments as objects, as vLLM passes them),
    encoded by tiktoken."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in copy.deepcopy(messages)]
    for m in messages:
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    text, _ = chat_template_utils.render_jinja_template(
        [messages], tools=tools, chat_template=TEMPLATE.read_text(), add_generation_prompt=True,
        date_string=DATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    return llama3_reference().encode(text[0], allowed_special="all")


@pytest.mark.parametrize("messages, tools", [
    (ASK, None), ([{"role": "system", "content": "Be brief."}] + ASK, None), (ASK, TOOLS)],
    ids=["no-system", "system", "tools"])
def test_tokenize_gives_the_published_template_tokens(server, messages, tools):
    body = {"messages": messages, "chat_template_kwargs": {"date_string": DATE}, **({"tools": tools} if tools else {})}
    r = httpx.post(server.url + "/tokenize", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == reference_ids(messages, tools)


def test_models_and_startup_say_which_format(server, ckpt):
    card = httpx.get(server.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]
    assert card["chat_format"] == f"chat template (chat template {TEMPLATE.name})"
    meta = Llama.build(str(ckpt), str(LLAMA3_TOKENIZER), max_seq_len=64, max_batch_size=1, device="cpu")
    assert meta.prompts.describe() == "Meta's Llama 3 format"


def test_a_checkpoints_own_template_is_used_by_default(ckpt, tmp_path):
    import shutil

    folder = tmp_path / "with-template"
    shutil.copytree(ckpt, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE.read_text()}))
    generator = Llama.build(str(folder), str(LLAMA3_TOKENIZER), max_seq_len=512, max_batch_size=1, device="cpu")
    assert "tokenizer_config.json" in generator.prompts.describe()
    assert generator.prompts.encode(ASK, date_string=DATE) == reference_ids(ASK)


def _valid(call, names=("get_weather",)):
    assert call.type == "function" and call.function.name in names and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(3))
def test_named_tool_choice_always_gives_a_valid_call(server, seed):
    client = server.openai()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="l31", messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed,
                                       temperature=1.0, max_tokens=200)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content is None
    _valid(message.tool_calls[0])
    chunks = list(client.chat.completions.create(model="l31", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                 seed=seed, temperature=1.0, max_tokens=200, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(d.content or "" for d in deltas)
    name = "".join(t.function.name or "" for d in deltas for t in d.tool_calls or [])
    arguments = "".join(t.function.arguments or "" for d in deltas for t in d.tool_calls or [])
    assert name == "get_weather"
    assert json.loads(arguments) == json.loads(message.tool_calls[0].function.arguments)  # same seed, same call


def test_required_and_the_openai_clients_own_stream_assembly(server):
    client = server.openai()
    with client.chat.completions.stream(model="l31", messages=ASK, tools=TOOLS, tool_choice="required",
                                        temperature=1.0, seed=5, max_tokens=200) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    _valid(final.choices[0].message.tool_calls[0], names=("get_weather", "get_time"))


def test_auto_reads_a_call_and_plain_text(server):
    """auto: an answer shaped as a call (forced here through response_format) comes back as tool_calls; one in
    plain text as content."""
    client = server.openai()
    schema = {"type": "object", "properties": {"name": {"const": "get_time"}, "parameters": SCHEMAS["get_time"]},
              "required": ["name", "parameters"], "additionalProperties": False}
    r = client.chat.completions.create(model="l31", messages=ASK, tools=TOOLS, temperature=1.0, seed=1,
                                       max_tokens=100, response_format={"type": "json_schema", "json_schema": {
                                           "name": "call", "schema": schema}})
    assert r.choices[0].finish_reason == "tool_calls"
    _valid(r.choices[0].message.tool_calls[0], names=("get_time",))
    text = client.chat.completions.create(model="l31", messages=ASK, tools=TOOLS, max_tokens=5, seed=2,
                                          extra_body={"structured_outputs": {"regex": "[a-z]{3} [a-z]{3}"}})
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content


def test_round_trip_call_result_answer(server):
    client = server.openai()
    first = client.chat.completions.create(model="l31", messages=ASK, tools=TOOLS, seed=3, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "{\"temperature\": 21}"}]
    answer = client.chat.completions.create(model="l31", messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=8, seed=3)
    assert answer.choices[0].message.content is not None and answer.choices[0].message.tool_calls is None
    r = httpx.post(server.url + "/tokenize", json={"messages": messages, "tools": TOOLS,
                                                   "chat_template_kwargs": {"date_string": DATE}}, timeout=TIMEOUT)
    assert r.json()["tokens"] == reference_ids(messages, TOOLS)


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}]},
     "tools[0].function.parameters", "cannot be used"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tools": TOOLS, "tool_choice": "required", "stop": ["}"]}, "stop", "cut the call short"),
    ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages[1].content", "string"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[1].tool_calls", "arguments")])
def test_bad_tools_get_a_400_naming_the_field(server, body, param, words):
    r = httpx.post(server.url + CC, json={"model": "l31", "messages": ASK, **body}, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert len(r.content) <= 1024


def test_library_chat_completion_returns_parsed_calls(templated, monkeypatch):
    said = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
    tokens = templated.tokenizer.encode(said, bos=False, eos=False)
    monkeypatch.setattr(templated, "generate", lambda prompts, *a, **k: ([list(tokens) for _ in prompts], None))
    (result,) = templated.chat_completion([ASK], tools=TOOLS)
    call = result["generation"]["tool_calls"][0]
    assert result["generation"]["content"] is None and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    (plain,) = templated.chat_completion([ASK])
    assert plain["generation"] == {"role": "assistant", "content": said}


def test_langchain_bind_tools(server):
    """LangChain's ChatOpenAI with bind_tools, a real agent-framework client, gets a valid call."""
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="l31", temperature=1.0,
                                       max_tokens=200, timeout=TIMEOUT, max_retries=0, seed=4)
    bound = chat.bind_tools(TOOLS, tool_choice="get_time")
    message = bound.invoke("What time is it in Tokyo?")
    (call,) = message.tool_calls
    assert call["name"] == "get_time" and call["id"]
    jsonschema.validate(call["args"], SCHEMAS["get_time"])


def test_chat_template_flag_fails_fast_naming_the_file(tmp_path, capsys):
    from llama.programs.serve import main, parse_args

    assert parse_args(["--chat-template", "t.jinja"]).chat_template == "t.jinja"
    assert main(["--port", "0", "--chat-template", str(tmp_path / "nope.jinja")]) == 2
    assert "nope.jinja" in capsys.readouterr().err
    (tmp_path / "broken.jinja").write_text("{% for %}")
    assert main(["--port", "0", "--chat-template", str(tmp_path / "broken.jinja")]) == 2
    assert "does not compile" in capsys.readouterr().err
