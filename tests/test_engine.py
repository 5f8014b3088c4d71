"""The row engine under every generation: the one sampler against transformers' own logits processors, n
choices sharing one prefill, deterministic mode in bfloat16, prompt log-probs, and failure isolation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from helpers import MHA, TOKENIZER, make_checkpoint
from llama import Llama, ModelArgs
from llama.engine import Chunk, Engine, Finished, Request, SamplingParams
from llama.engine.params import MIN_TEMPERATURE
from llama.engine.sampler import RowSampler, distribution

SHAPE = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("engine"), SHAPE, seed=11)


@pytest.fixture(scope="module")
def gen(ckpt) -> Llama:
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=128, max_batch_size=6, device="cpu", dtype="float32")


class Collect:
    def __init__(self) -> None:
        self.events: List = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def tokens(self, index: int = 0) -> List[int]:
        return [t for e in self.events if isinstance(e, Chunk) and e.index == index for t in e.tokens]

    def finished(self, index: int = 0) -> Optional[Finished]:
        done = [e for e in self.events if isinstance(e, Finished) and e.index == index]
        return done[-1] if done else None


def run(engine: Engine, requests: Sequence[Request], limit: int = 500) -> None:
    """Add requests as rows and blocks free up and step until all have finished."""
    waiting = list(requests)
    for _ in range(limit):
        while waiting and engine.can_add(waiting[0]):
            engine.add(waiting.pop(0))
        if not engine.step() and not waiting:
            return
    raise AssertionError("the engine did not finish")


def prompts(n: int, seed: int = 0) -> List[List[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


# --- the sampler against an independent implementation -----------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, top_k=50),
    dict(temperature=1.0, top_k=200, top_p=0.8),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=0.8, top_k=100, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
    dict(temperature=1.1, repetition_penalty=0.7),
])
def test_distribution_equals_transformers_logits_processors(options):
    """The probabilities a row draws from equal those of transformers' processors in generate's order
    (repetition penalty, then temperature, top-k, top-p, min-p) over the same prompt and answer."""
    generation = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    vocab = 4096
    logits = torch.randn(3, vocab) * 4
    history = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 17, 40)]
    params = SamplingParams(**options)
    rows = []
    for h in history:
        row = RowSampler(params, h[:3], seed=0, device=torch.device("cpu"))
        for t in h[3:]:
            row.record(t)
        rows.append(row)
    ours = distribution(logits, rows)
    chain = []
    if params.repetition_penalty != 1.0:
        chain.append(generation.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    chain.append(generation.TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(generation.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        chain.append(generation.TopPLogitsWarper(params.top_p))
    if params.min_p:
        chain.append(generation.MinPLogitsWarper(params.min_p))
    for i, h in enumerate(history):
        scores = logits[i:i + 1].clone()
        ids = torch.tensor([h])
        for processor in chain:
            scores = processor(ids, scores)
        theirs = torch.softmax(scores, dim=-1)[0]
        torch.testing.assert_close(ours[i], theirs, atol=1e-6, rtol=1e-5)


def test_presence_frequency_penalties_and_logit_bias_follow_openais_formula():
    """OpenAI's definition: logit - frequency_penalty * count - presence_penalty * (count > 0), over the answer
    only; logit_bias is added to the named tokens."""
    logits = torch.linspace(-3, 3, 64)
    params = SamplingParams(temperature=1.0, top_p=1.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={7: 3.0, 9: -100.0})
    row = RowSampler(params, prompt=[1, 2, 3], seed=0, device=torch.device("cpu"))
    for t in [5, 5, 5, 11, 2]:
        row.record(t)
    expected = logits.clone()
    for token, count in {5: 3, 11: 1, 2: 1}.items():
        expected[token] -= 0.25 * count + 0.5
    expected[7] += 3.0
    expected[9] -= 100.0
    torch.testing.assert_close(row.adjust(logits.clone()), expected)


def test_tiny_temperatures_are_greedy_and_never_overflow(gen):
    prompt = prompts(1, seed=5)[0]
    greedy = gen.generate([prompt], max_gen_len=8, temperature=0)[0]
    assert gen.generate([prompt], max_gen_len=8, temperature=1e-40)[0] == greedy
    assert MIN_TEMPERATURE > 1e-40
    out, _ = gen.generate([prompt], max_gen_len=8, temperature=2 * MIN_TEMPERATURE, top_p=1.0)
    assert len(out[0]) == 8 and all(0 <= t < 32000 for t in out[0])


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logit_bias={40000: 1.0}), "logit_bias"), (dict(logit_bias={5: 101}), r"logit_bias\[5\]"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"), (dict(typo_option=1), "typo_option"),
])
def test_bad_sampling_options_are_named(gen, bad, message):
    with pytest.raises(ValueError, match=message):
        gen.generate([[1, 5, 6]], max_gen_len=2, **bad)


def test_library_methods_take_the_engines_options(gen):
    """A logit_bias of +100 on one token makes greedy decoding repeat it; a stop token id ends the answer."""
    out, _ = gen.generate([[1, 5, 6]], max_gen_len=4, temperature=0, logit_bias={1234: 100.0})
    assert out[0] == [1234] * 4
    out, _ = gen.generate([[1, 5, 6]], max_gen_len=4, temperature=0, logit_bias={1234: 100.0},
                          stop_token_ids=[1234])
    assert out[0] == []


# --- n choices, prompt log-probs --------------------------------------------------------------------------


def test_n_choices_share_one_prefill_and_equal_seeded_requests(gen, monkeypatch):
    """n=3 seeded choices: one prefill (its row copied into the others), and choice i equals a request alone
    seeded seed + i."""
    prompt = prompts(1, seed=9)[0]
    calls = []
    real = type(gen.model).prefill
    monkeypatch.setattr(gen.model, "prefill", lambda *a, **k: calls.append(a[0]) or real(gen.model, *a, **k))
    sink = Collect()
    run(gen.engine, [Request(prompt, SamplingParams(max_tokens=10, temperature=1.0, top_p=1.0, seed=40, n=3), sink)])
    assert len(calls) == 1
    for i in range(3):
        alone = Collect()
        run(gen.engine, [Request(prompt, SamplingParams(max_tokens=10, temperature=1.0, top_p=1.0, seed=40 + i),
                                 alone)])
        assert sink.tokens(i) == alone.tokens() and sink.finished(i).reason == alone.finished().reason
    assert len({tuple(sink.tokens(i)) for i in range(3)}) > 1  # the choices do differ


def test_prompt_log_probs_with_max_tokens_zero_are_the_models(gen):
    """max_tokens 0 with prompt log-probs (what evaluation harnesses ask): the log-softmax of a plain forward
    pass at each prompt position, and no token generated."""
    prompt = prompts(1, seed=3)[0]
    sink = Collect()
    run(gen.engine, [Request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=True), sink)])
    (chunk,) = [e for e in sink.events if isinstance(e, Chunk)]
    with torch.inference_mode():
        logits = gen.model.forward(torch.tensor([prompt]))[0]
    expected = torch.log_softmax(logits[:-1].double(), -1).gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1))
    assert chunk.prompt_logprobs[0] == 0.0
    torch.testing.assert_close(torch.tensor(chunk.prompt_logprobs[1:]).double(), expected.squeeze(-1),
                               atol=1e-5, rtol=0)
    assert chunk.tokens == [] and sink.finished().reason == "length"


# --- deterministic mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_deterministic_mode_answers_never_depend_on_the_batch(ckpt, dtype):
    """16 greedy and seeded requests through 6 rows, joining as others finish, give bit for bit what each gives
    alone. (In the default mode bf16 answers may differ: different batch shapes take different kernels.)"""
    g = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=128, max_batch_size=6, device="cpu", dtype=dtype,
                    deterministic=True)
    specs = [SamplingParams(max_tokens=16, temperature=0.0 if i < 8 else 0.9, top_p=1.0,
                            seed=None if i < 8 else i) for i in range(16)]
    ps = prompts(16, seed=1)
    together = [Collect() for _ in ps]
    run(g.engine, [Request(p, s, sink) for p, s, sink in zip(ps, specs, together)])
    for p, s, sink in zip(ps, specs, together):
        alone = Collect()
        run(g.engine, [Request(p, s, alone)])
        assert sink.tokens() == alone.tokens()


# --- failure isolation -------------------------------------------------------------------------------------


def test_a_failing_sink_or_sampler_ends_only_its_own_request(gen, monkeypatch):
    ps = prompts(4, seed=2)
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = [gen.generate([p], max_gen_len=8, temperature=0)[0][0] for p in ps]

    def broken_sink(event):
        raise RuntimeError("client went away badly")

    poisoned = SamplingParams(max_tokens=8, temperature=0, logit_bias={77: 1.0})
    real_adjust = RowSampler.adjust

    def adjust(self, logits):
        if 77 in self.params.logit_bias:
            raise FloatingPointError("poisoned row")
        return real_adjust(self, logits)

    monkeypatch.setattr(RowSampler, "adjust", adjust)
    sinks = [Collect() for _ in ps]
    bad = Collect()
    requests = [Request(p, params, s) for p, s in zip(ps, sinks)]
    requests.insert(1, Request(ps[0], params, broken_sink))
    requests.insert(3, Request(ps[1], poisoned, bad))
    run(gen.engine, requests)
    assert [s.tokens() for s in sinks] == expected
    assert bad.finished().reason == "error" and "poisoned row" in bad.finished().message
    assert gen.engine.failure is None and gen.engine.free_rows() == gen.max_batch_size


def test_a_failing_prefill_ends_its_requests_and_a_failing_decode_marks_the_engine(ckpt, monkeypatch):
    """A prefill that fails ends the requests it held (the prompts are the suspects) and the engine goes on;
    a decode that fails means the model cannot serve: every request ends and `failure` says why."""
    g = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=3, device="cpu", dtype="float32")
    running = Collect()
    g.engine.add(Request([1, 9, 10], SamplingParams(max_tokens=6, temperature=0), running))
    g.engine.step()
    real_prefill = type(g.model).prefill
    monkeypatch.setattr(g.model, "prefill", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    sinks = [Collect(), Collect()]
    g.engine.add(Request([1, 5, 6], SamplingParams(max_tokens=4), sinks[0]))
    g.engine.add(Request([1, 7, 8], SamplingParams(max_tokens=4), sinks[1]))
    g.engine.step()
    assert all(s.finished().reason == "error" and "out of memory" in s.finished().message for s in sinks)
    assert g.engine.failure is None and running.finished() is None
    with pytest.raises(RuntimeError, match="out of memory"):
        g.generate([[1, 5]], max_gen_len=2)
    monkeypatch.setattr(g.model, "prefill", lambda *a, **k: real_prefill(g.model, *a, **k))
    while g.engine.step():
        pass
    assert running.tokens() == g.generate([[1, 9, 10]], max_gen_len=6, temperature=0)[0][0]
    monkeypatch.setattr(g.model, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bus error")))
    broken = Collect()
    g.engine.add(Request([1, 11], SamplingParams(max_tokens=4), broken))
    g.engine.step()  # the prefill works
    g.engine.step()  # the decode fails
    assert broken.finished().reason == "error" and "bus error" in g.engine.failure
