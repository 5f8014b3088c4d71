"""Evaluation over the completions API: prompt lists, echo with logprobs and max_tokens 0 (prompt
log-likelihoods), and the tokenizer endpoints, checked against transformers' LlamaForCausalLM on the same
weights and tokens, through the openai client and through lm-evaluation-harness's own `local-completions`
client with its remote tokenizer."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from llama import Llama
from llama.checkpoints.checkpoint import random_state

from helpers import MHA, TOKENIZER, make_checkpoint
from serve_support import TIMEOUT, ThreadServer

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from test_parity import meta_to_hf  # noqa: E402  (after the skip: it needs transformers)

PROMPTS = ["The capital of France is", "Once upon a time there was", "1 2 3 4"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random checkpoint served in fp32, and transformers' model with the same weights."""
    state = random_state(MHA, seed=11)
    folder = make_checkpoint(tmp_path_factory.mktemp("eval"), MHA, state=state)
    gen = Llama.build(str(folder), str(TOKENIZER), max_seq_len=128, max_batch_size=4, device="cpu",
                      dtype="float32")
    with ThreadServer(gen, model="random") as server:
        yield server, gen, meta_to_hf(state, MHA)


def hf_logprobs(hf, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, and the likeliest token at each of those positions."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    lps = torch.log_softmax(logits[:-1], -1)
    return lps.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1), lps.argmax(-1)


def test_echo_logprobs_of_a_prompt_list_match_transformers(served):
    """A list of prompts, echo, logprobs 1 and max_tokens 0: each choice (at its prompt's index) holds the
    prompt's tokens, a null first log-prob, then transformers' log-probs and the top alternative."""
    server, gen, hf = served
    client = server.openai()
    r = client.completions.create(model="random", prompt=PROMPTS, echo=True, logprobs=1, max_tokens=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, r.choices):
        ids = gen.tokenizer.encode(prompt, bos=True, eos=False)
        assert choice.text == prompt and choice.finish_reason == "length"
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected, best = hf_logprobs(hf, ids)
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=0)
        for top, b in zip(lp.top_logprobs[1:], best.tolist()):
            (text, _), = top.items()
            assert text == gen.tokenizer.token_bytes(b).decode("utf-8", "replace")
    assert r.usage.prompt_tokens == sum(len(gen.tokenizer.encode(p, bos=True, eos=False)) for p in PROMPTS)
    assert r.usage.completion_tokens == 0


def test_token_prompts_and_a_generated_token(served):
    """Token-id prompts with echo, logprobs and max_tokens 1: the prompt's entries, then the answer's."""
    server, gen, hf = served
    ids = [gen.tokenizer.encode(p, bos=False, eos=False) for p in PROMPTS[:2]]
    r = server.openai().completions.create(model="random", prompt=ids, echo=True, logprobs=2, max_tokens=1,
                                           temperature=0)
    for tokens, choice in zip(ids, r.choices):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(tokens) + 1 and len(lp.top_logprobs[-1]) == 2
        expected, _ = hf_logprobs(hf, tokens)
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:-1]), expected, atol=1e-4, rtol=0)


def test_streamed_echo_carries_the_prompt_logprobs(served):
    server, gen, hf = served
    ids = gen.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=TIMEOUT,
                      json={"model": "random", "prompt": PROMPTS[0], "echo": True, "logprobs": 0, "max_tokens": 2,
                            "stream": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    first = events[0]["choices"][0]
    assert first["text"] == PROMPTS[0] and first["logprobs"]["token_logprobs"][0] is None
    expected, _ = hf_logprobs(hf, ids)
    torch.testing.assert_close(torch.tensor(first["logprobs"]["token_logprobs"][1:]), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("body, param, piece", [
    ({"prompt": ["a", [1, 2]]}, "prompt", "mixes"),
    ({"prompt": [[1, 2], "a"]}, "prompt", "mixes"),
    ({"prompt": "a", "logprobs": 6, "echo": True}, "logprobs", "0..5"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "echo"),
    ({"prompt": ["a", "b"], "stream": True}, "stream", "one prompt"),
    ({"prompt": ["a"] * 65}, "prompt", "up to 64"),
])
def test_bad_evaluation_requests_name_their_parameter(served, body, param, piece):
    server, _, _ = served
    r = httpx.post(server.url + "/v1/completions", json={"model": "random", **body}, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and piece in r.json()["error"]["message"]


def test_tokenizer_endpoints_in_vllms_shapes(served):
    server, gen, _ = served
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=TIMEOUT)
    sp = gen.tokenizer.sp_model if hasattr(gen.tokenizer, "sp_model") else None
    text = "Hello wörld 😀"
    with_bos = post("/tokenize", {"prompt": text}).json()
    bare = post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    expected = sp.encode(text) if sp is not None else gen.tokenizer.encode(text, bos=False, eos=False)
    assert bare["tokens"] == expected and with_bos["tokens"] == [gen.tokenizer.bos_id] + expected
    assert with_bos["count"] == len(expected) + 1 and with_bos["max_model_len"] == 128
    assert post("/detokenize", {"tokens": expected}).json() == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info", timeout=TIMEOUT).json()
    assert (info["bos_token"], info["eos_token"]) == ("<s>", "</s>")
    bad = post("/detokenize", {"tokens": [1, 10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == gen.formatter.encode_dialog_prompt([{"role": "user", "content": "hi"}])


QUESTIONS = [("Water is", [" wet", " dry", " loud"], 0), ("The sky is", [" blue", " green"], 0),
             ("One plus one is", [" two", " three", " seven"], 0), ("Cats like to", [" sleep", " bark"], 1),
             ("Paris is in", [" France", " Peru"], 0), ("Ice is", [" cold", " hot", " purple"], 1)]

TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_accuracy_equals_transformers(served, tmp_path, monkeypatch):
    """lm-evaluation-harness's own local-completions client, tokenizing through the server (remote tokenizer),
    on a local multiple-choice task: its accuracy equals the one transformers' log-probs give on the tokens
    lm-eval itself made."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    server, gen, hf = served
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="random", tokenizer_backend="remote",
                             tokenized_requests=True, max_length=128)
    result = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                             log_samples=True)
    acc = result["results"]["tiny_mc"]["acc,none"]

    correct = []
    for sample in sorted(result["samples"]["tiny_mc"], key=lambda s: s["doc_id"]):
        scores = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            served_lp = float(resp[0][0])  # each response: [(log-likelihood, is_greedy)]
            ctx, cont = lm._encode_pair(context, continuation)  # lm-eval's own tokens
            expected, _ = hf_logprobs(hf, ctx + cont)
            score = float(expected[len(ctx) - 1:].sum())
            assert math.isclose(score, served_lp, abs_tol=1e-3), (context, continuation)
            scores.append(score)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"])
    assert len(correct) == len(QUESTIONS)
    assert acc == pytest.approx(sum(correct) / len(correct))
