"""The continuous-batching engine without HTTP: admission, row placement, sampling, stops, cancellation, MP.

Steps are driven by hand here (`engine.step()`), so each test decides exactly which requests share a step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

from helpers import MHA, TOKENIZER, make_checkpoint, run_torchrun
from llama import Llama
from llama.engine.sampler import RowSampler, choose
from llama.serve import Chunk, Engine, Finished, QueueFull, Request, SamplingParams, Unavailable
from llama.engine.stop import StopText
from test_streaming import EOS, HELLO, WORLD, scripted_checkpoint

PROMPTS = ["Hello", "Once upon a time there was", "a", "世界😀 and", "The quick brown fox jumps over the", "Hi",
           "Ω\n", " leading space"]


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("random"), MHA, seed=7)


@pytest.fixture(scope="module")
def gen(random_dir) -> Llama:
    return Llama.build(str(random_dir), str(TOKENIZER), max_seq_len=96, max_batch_size=4, device="cpu",
                       dtype="float32")


@pytest.fixture(scope="module")
def looping(tmp_path_factory) -> Llama:
    """A scripted model answering every prompt 'Hello world world world ...' (never EOS)."""
    folder = scripted_checkpoint(tmp_path_factory.mktemp("loop"), {None: [HELLO, WORLD, WORLD]})
    return Llama.build(str(folder), str(TOKENIZER), max_seq_len=64, max_batch_size=2, device="cpu",
                       dtype="float32")


class Collect:
    """A request's events, kept in order."""

    def __init__(self) -> None:
        self.events: List = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Chunk))

    @property
    def finished(self) -> Optional[Finished]:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, Finished) else None


def request(gen: Llama, prompt: str, **params) -> Tuple[Request, Collect]:
    sink = Collect()
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 12)
    return Request(gen.tokenizer.encode(prompt, bos=True, eos=False), SamplingParams(**params), sink), sink


def run(engine: Engine, requests: Sequence[Request], limit: int = 1000) -> int:
    for r in requests:
        engine.submit(r)
    steps = 0
    while engine.step():
        steps += 1
        assert steps < limit
    return steps


# --- row placement never changes an answer -----------------------------------------------------------------


@pytest.mark.parametrize("fixed", [True, False])
def test_answers_in_a_shared_batch_equal_answers_alone(gen, fixed):
    """8 ragged greedy requests and 3 seeded sampled ones through 4 rows (joining as others finish) give what
    each gets alone, and (greedy) what Llama.text_completion gives."""
    engine = Engine(gen, fixed_shape=fixed)
    specs = [dict(prompt=p, max_tokens=3 + 4 * (i % 4)) for i, p in enumerate(PROMPTS)]
    specs += [dict(prompt=p, max_tokens=12, temperature=0.9, top_p=0.95, seed=100 + i)
              for i, p in enumerate(PROMPTS[:3])]
    together = [request(gen, **s) for s in specs]
    run(engine, [r for r, _ in together])
    for spec, (_, sink) in zip(specs, together):
        alone_req, alone = request(gen, **spec)
        run(engine, [alone_req])
        assert sink.text == alone.text, spec
        assert sink.finished.reason == alone.finished.reason
        assert sink.finished.completion_tokens == alone.finished.completion_tokens
        if spec.get("temperature", 0) == 0:
            expected = gen.text_completion([spec["prompt"]], temperature=0, max_gen_len=spec["max_tokens"])
            assert sink.text == expected[0]["generation"], spec


def test_seeded_sampling_matches_a_fresh_generator(random_dir):
    """A request's seed plays the part of Llama.build's seed: the same draws as a fresh generator's first call."""
    for seed in (5, 6):
        fresh = Llama.build(str(random_dir), str(TOKENIZER), max_seq_len=96, max_batch_size=1, device="cpu",
                            dtype="float32", seed=seed)
        expected = fresh.text_completion(["Hello"], temperature=0.9, top_p=0.95, max_gen_len=20)[0]["generation"]
        engine = Engine(fresh)
        req, sink = request(fresh, "Hello", temperature=0.9, top_p=0.95, seed=seed, max_tokens=20)
        run(engine, [req])
        assert sink.text == expected


def test_each_row_samples_as_it_would_alone():
    """The sampler works row by row: six rows of mixed parameters draw what each draws alone."""
    torch.manual_seed(0)
    logits = torch.randn(6, 4096) * 3
    options = [dict(temperature=0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=20),
               dict(temperature=0, logit_bias={3: 50.0}), dict(temperature=1.3, min_p=0.1),
               dict(temperature=0.5, top_p=0.3, repetition_penalty=1.2)]
    for trial in range(20):
        rows = [RowSampler(SamplingParams(**o), [1, 2, 3], 100 * trial + i, torch.device("cpu"))
                for i, o in enumerate(options)]
        got = choose(logits, rows)
        for i, o in enumerate(options):
            alone = choose(logits[i:i + 1], [RowSampler(SamplingParams(**o), [1, 2, 3], 100 * trial + i,
                                                        torch.device("cpu"))])
            assert got[i] == alone[0]


# --- admission and the step's shape ----------------------------------------------------------------------


@pytest.mark.parametrize("fixed", [True, False])
def test_waiting_requests_join_with_one_packed_prefill(gen, fixed):
    """Admissions share one packed prefill. A fixed-shape step (compiled) decodes all 4 rows every time; an
    eager one rows 0..the highest busy row."""
    engine = Engine(gen, fixed_shape=fixed)
    prefills, decodes = [], []
    model, step = gen.model, gen.decode_step
    original_prefill, original_call = model.prefill, type(step).__call__

    def spy_prefill(prompts, rows=None, all_logits=False):
        prefills.append((len(prompts), list(rows)))
        return original_prefill(prompts, rows=rows, all_logits=all_logits)

    model.prefill = spy_prefill
    type(step).__call__ = lambda self, tokens, positions: decodes.append(tuple(tokens.shape)) or \
        original_call(self, tokens, positions)
    try:
        first = [request(gen, p, max_tokens=30) for p in PROMPTS[:2]]
        for r, _ in first:
            engine.submit(r)
        engine.step()
        assert prefills == [(2, [0, 1])] and decodes == []  # the first step only prefills
        engine.step()
        late = [request(gen, p, max_tokens=30) for p in PROMPTS[2:5]]  # 3 arrive; 2 rows are free
        for r, _ in late:
            engine.submit(r)
        engine.step()
        assert prefills[-1] == (2, [2, 3]) and engine.stats()["waiting"] == 1
        while engine.step():
            pass
    finally:
        del model.prefill
        type(step).__call__ = original_call
    if fixed:
        assert set(decodes) == {(4,)}  # every decode runs all max_batch_size rows
    else:
        assert decodes[:3] == [(2,), (2,), (4,)] and set(decodes) <= {(1,), (2,), (3,), (4,)}
    assert all(len(rows) <= 4 for _, rows in prefills)
    assert all(s.finished.reason == "length" for _, s in first + late)


def test_max_prefill_tokens_bounds_each_steps_prefill(gen):
    """Admissions stop at the token budget (the first waiting request always goes in); the rest join at the
    next boundaries, first come first served, with the same answers."""
    reqs = [request(gen, p, max_tokens=6) for p in PROMPTS[:4]]
    sizes = [len(r.prompt) for r, _ in reqs]
    budget = sizes[0] + sizes[1]  # the first two fit, the third does not
    engine = Engine(gen, max_prefill_tokens=budget)
    prefills = []
    original = gen.model.prefill
    gen.model.prefill = lambda prompts, rows=None, all_logits=False: prefills.append(sum(map(len, prompts))) or \
        original(prompts, rows=rows, all_logits=all_logits)
    try:
        run(engine, [r for r, _ in reqs])
    finally:
        del gen.model.prefill
    assert prefills[0] == budget and all(n <= max(budget, max(sizes)) for n in prefills) and len(prefills) >= 2
    alone = [gen.text_completion([p], max_gen_len=6, temperature=0)[0]["generation"] for p in PROMPTS[:4]]
    assert [sink.text for _, sink in reqs] == alone
    with pytest.raises(ValueError, match="max_prefill_tokens must be a positive integer"):
        Engine(gen, max_prefill_tokens=0)


def test_a_finished_row_is_reused_at_the_next_boundary(looping):
    engine = Engine(looping)
    short, short_sink = request(looping, "a", max_tokens=2)
    long, _ = request(looping, "b", max_tokens=50)
    waiting, waiting_sink = request(looping, "c", max_tokens=3)
    for r in (short, long, waiting):
        engine.submit(r)
    engine.step()  # short and long prefilled (2 rows), waiting waits
    engine.step()  # short has its 2 tokens: done, row freed
    assert short_sink.finished.reason == "length" and short_sink.text == "Hello world"
    stats = engine.stats()
    assert {k: stats[k] for k in ("running", "waiting", "max_batch_size", "max_queue", "preemptions")} == \
        {"running": 1, "waiting": 1, "max_batch_size": 2, "max_queue": 64, "preemptions": 0}
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 0
    engine.stop(cancel=True)
    while engine.step():
        pass
    assert waiting_sink.finished.reason == "cancelled"


def test_cancel_frees_the_row_at_the_next_step(looping):
    engine = Engine(looping)
    req, sink = request(looping, "a", max_tokens=60)
    engine.submit(req)
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 1
    engine.cancel(req)
    engine.step()
    assert engine.stats()["running"] == 0 and sink.finished.reason == "cancelled"
    assert sink.finished.completion_tokens == 2
    queued, queued_sink = request(looping, "b")
    engine.cancel(queued)  # cancelled before it ever ran
    engine.submit(queued)
    engine.step()
    assert queued_sink.finished.reason == "cancelled" and engine.stats()["waiting"] == 0


def test_queue_is_bounded(looping):
    engine = Engine(looping, max_queue=1)
    requests = [request(looping, "a", max_tokens=50)[0] for _ in range(4)]
    for r in requests[:3]:  # two free rows and one queue place
        engine.submit(r)
    with pytest.raises(QueueFull):
        engine.submit(requests[3])
    engine.step()  # two run, one waits
    with pytest.raises(QueueFull):
        engine.submit(requests[3])
    engine.drain()
    with pytest.raises(Unavailable):
        engine.submit(request(looping, "a")[0])
    engine.stop(cancel=True)


def test_run_thread_drains_and_stops(looping):
    engine = Engine(looping)
    engine.start()
    reqs = [request(looping, "a", max_tokens=n) for n in (5, 9)]
    for r, _ in reqs:
        engine.submit(r)
    assert engine.stop(timeout=60)  # drains: both finish
    assert [s.finished.reason for _, s in reqs] == ["length", "length"]
    assert reqs[1][1].text == "Hello" + " world" * 8


# --- stops, lengths, log-probs, checks -------------------------------------------------------------------


def test_stop_strings_cut_the_answer(looping):
    engine = Engine(looping)
    cases = [(["world"], "Hello "), (["d w"], "Hello worl"), (["o w", "ld wo"], "Hell"), (["xyz"], None)]
    for stop, expected in cases:
        req, sink = request(looping, "a", max_tokens=6, stop=stop)
        run(engine, [req])
        if expected is None:
            assert sink.text == "Hello" + " world" * 5 and sink.finished.reason == "length"
        else:
            assert sink.text == expected and sink.finished.reason == "stop", stop


def test_stop_text_holds_back_what_may_become_a_stop():
    s = StopText(["###", "END"])
    assert s.feed("hello #") == ("hello ", False)
    assert s.feed("#") == ("", False)
    assert s.feed(" x") == ("## x", False)
    assert s.feed("EN") == ("", False)
    assert s.feed("D and more") == ("", True)
    s = StopText(["ab"])
    assert s.feed("xa") == ("x", False) and s.flush() == "a"
    assert StopText([]).feed("abc") == ("abc", False)


def _first_stop(text: str, stops) -> Tuple[str, bool]:
    """The reference: cut where the first stop string to appear in full begins."""
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    return (text[:min(ends)[1]], True) if ends else (text, False)


def test_stop_text_matches_the_reference_over_any_chunking():
    import random

    rng = random.Random(0)
    for _ in range(3000):
        alphabet = "ab c"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        s = StopText(stops)
        out, stopped = "", False
        for chunk in chunks:
            piece, stopped = s.feed(chunk)
            out += piece
            assert len(s.held) < max(map(len, stops))  # never more than a stop string's length held back
            if stopped:
                break
        if not stopped:
            out += s.flush()
        assert (out, stopped) == _first_stop(text, stops), (text, stops, chunks)


def test_stop_matching_is_linear_in_the_answer():
    """A long answer streamed one character at a time past a long stop string that keeps almost matching:
    the old matcher re-compared the held tail with every prefix of the stop string at each chunk (quadratic:
    minutes here); the automaton takes one step per character per stop."""
    stop = "a" * 5000 + "b"
    s = StopText([stop, "zz"])
    start = time.perf_counter()
    out = []
    for _ in range(100_000):
        out.append(s.feed("a")[0])
    elapsed = time.perf_counter() - start
    assert len("".join(out)) == 100_000 - 5000 and len(s.held) == 5000  # a possible start of the stop
    assert s.feed("b") == ("", True)
    assert elapsed < 20, f"{elapsed:.1f} s for 100000 characters"


def test_eos_ends_with_stop_and_is_not_counted(tmp_path):
    folder = scripted_checkpoint(tmp_path, {None: [HELLO, WORLD, EOS]})
    g = Llama.build(str(folder), str(TOKENIZER), max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    engine = Engine(g)
    req, sink = request(g, "a", max_tokens=10)
    run(engine, [req])
    assert sink.text == "Hello world"
    assert (sink.finished.reason, sink.finished.completion_tokens) == ("stop", 2)


def test_logprobs_are_the_models(gen):
    engine = Engine(gen)
    req, sink = request(gen, "Hello", max_tokens=5, logprobs=3)
    run(engine, [req])
    entries = [e for ev in sink.events if isinstance(ev, Chunk) for e in ev.logprobs]
    assert len(entries) == 5
    tokens = gen.tokenizer.encode("Hello", bos=True, eos=False)
    with torch.inference_mode():
        logits = gen.model.prefill([tokens])
    lps = torch.log_softmax(logits[0], -1)
    assert entries[0].logprob == pytest.approx(lps.max().item(), abs=1e-5)
    assert [lp for _, _, lp in entries[0].top] == pytest.approx(lps.topk(3).values.tolist(), abs=1e-5)
    assert all(len(e.top) == 3 and e.logprob == pytest.approx(e.top[0][2]) for e in entries)  # greedy: the top one


@pytest.mark.parametrize("prompt, params, message", [
    ([], {}, "non-empty"),
    ([1, 10 ** 6], {}, "outside"),
    ([1] * 96, {}, "up to 95"),
    ([1] * 90, {"max_tokens": 7}, "at most 6"),
    ([1], {"n": 5}, "n=5 choices"),
    ([1], {"temperature": -1}, "temperature"),
    ([1], {"top_p": 0}, "top_p"),
    ([1], {"logprobs": 21}, "logprobs"),
])
def test_bad_requests_are_refused_at_submit(gen, prompt, params, message):
    engine = Engine(gen)
    with pytest.raises(ValueError, match=message):
        engine.submit(Request(prompt, SamplingParams(**{"max_tokens": 1, **params}), lambda e: None))
    assert engine.stats()["waiting"] == 0


def test_a_failing_prefill_ends_its_requests_and_the_engine_goes_on(gen):
    """A prefill that fails ends the requests admitted in that step (error, rows freed); a running request
    loses nothing (its decode is redone) and the next request is served."""
    engine = Engine(gen)
    running, running_sink = request(gen, "Hello", max_tokens=8)
    engine.submit(running)
    engine.step()
    victim, sink = request(gen, "Once upon a time")
    engine.submit(victim)
    gen.model.prefill = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        engine.step()
    finally:
        del gen.model.prefill
    assert sink.finished.reason == "error" and "boom" in sink.finished.message
    assert engine.failure is None and engine.stats()["running"] == 1
    late, late_sink = request(gen, "a")
    engine.submit(late)
    engine.step()  # decodes the running row alone: a working decode clears the model
    # the late request holds its row already; its prefill waited for this decode-only step
    stats = engine.stats()
    assert {k: stats[k] for k in ("running", "waiting", "max_batch_size", "max_queue", "preemptions")} == \
        {"running": 2, "waiting": 0, "max_batch_size": 4, "max_queue": 64, "preemptions": 0}
    assert late_sink.events == []
    while engine.step():
        pass
    assert late_sink.finished.reason == "length"
    alone = gen.text_completion(["Hello"], temperature=0, max_gen_len=8)[0]["generation"]
    assert running_sink.text == alone and running_sink.finished.reason == "length"
    again, again_sink = request(gen, "Once upon a time")
    run(engine, [again])
    assert again_sink.finished.reason == "length"


def test_whatever_fails_in_one_request_ends_that_request_alone(gen, monkeypatch):
    """Admission, sampling, turning tokens into text, and the sink each fail for one request: that request
    ends (error, or cancelled for its own broken sink) and frees its row; the others get their answers."""
    import llama.engine.outputs as outputs

    engine = Engine(gen)
    ok, ok_sink = request(gen, "Hello", max_tokens=10)
    no_row, no_row_sink = request(gen, "a", max_tokens=10)
    bad_sampling, bad_sampling_sink = request(gen, "Hi", max_tokens=10, temperature=0.77, seed=1)
    bad_text, bad_text_sink = request(gen, "Ω\n", max_tokens=10)
    bad_sink = Request(gen.tokenizer.encode("xyz", bos=True, eos=False), SamplingParams(max_tokens=10),
                       lambda event: 1 / 0)

    start = engine.engine._new_choice

    def start_or_fail(req, index, parent):
        if req is no_row:
            raise RuntimeError("no generator for you")
        r = start(req, index, parent)
        if req is bad_text:
            r.text.push = lambda token: 1 / 0
        return r

    sample = outputs.choose

    def sample_or_fail(logits, rows):
        if any(r.params.temperature == 0.77 for r in rows):
            raise RuntimeError("bad sampling")
        return sample(logits, rows)

    monkeypatch.setattr(engine.engine, "_new_choice", start_or_fail)
    monkeypatch.setattr(outputs, "choose", sample_or_fail)
    for r in (ok, no_row, bad_sampling, bad_text, bad_sink):
        engine.submit(r)
    while engine.step():
        pass
    assert engine.failure is None
    assert "no generator for you" in no_row_sink.finished.message and no_row_sink.finished.reason == "error"
    assert bad_sampling_sink.finished.reason == "error" and "sampling" in bad_sampling_sink.finished.message
    assert bad_text_sink.finished.reason == "error" and "ZeroDivisionError" in bad_text_sink.finished.message
    assert engine.finished["cancelled"] == 1 and engine.finished["error"] == 3  # the broken sink's request
    alone = gen.text_completion(["Hello"], temperature=0, max_gen_len=10)[0]["generation"]
    assert ok_sink.text == alone and ok_sink.finished.reason == "length"
    assert engine.stats()["running"] == 0
    again, again_sink = request(gen, "Hello", max_tokens=10)
    run(engine, [again])
    assert again_sink.text == alone


def test_abort_ends_running_and_waiting_requests_with_a_message(looping):
    engine = Engine(looping)
    reqs = [request(looping, p, max_tokens=50) for p in "abc"]  # two rows: one waits
    for r, _ in reqs:
        engine.submit(r)
    engine.step()
    engine.step()
    assert engine.abort("time is up") == 3
    engine.step()
    assert [s.finished.reason for _, s in reqs] == ["abort"] * 3
    assert all(s.finished.message == "time is up" for _, s in reqs)
    assert reqs[0][1].text == "Hello world" and reqs[2][1].text == "" and engine.stats()["running"] == 0


def test_tiny_temperatures_are_greedy_and_huge_seeds_are_refused(gen):
    engine = Engine(gen)
    greedy, greedy_sink = request(gen, "Hello", max_tokens=8)
    tiny, tiny_sink = request(gen, "Hello", max_tokens=8, temperature=1e-40, seed=3)
    run(engine, [greedy, tiny])
    assert tiny_sink.text == greedy_sink.text and tiny_sink.finished.reason == "length"
    for seed in (2 ** 64, -1, 1.5):
        with pytest.raises(ValueError, match="seed"):
            engine.submit(request(gen, "Hello", temperature=1.0, seed=seed)[0])
    top, top_sink = request(gen, "Hello", max_tokens=4, temperature=1.0, seed=2 ** 64 - 1)
    run(engine, [top])
    assert top_sink.finished.reason == "length"


def test_sampling_is_finite_for_float16_logits_and_tiny_temperatures():
    logits = (torch.randn(3, 1000) * 20).half()
    rows = [RowSampler(SamplingParams(temperature=t, top_p=p), [1], seed=i, device=torch.device("cpu"))
            for i, (t, p) in enumerate([(1e-4, 1.0), (1e-40, 1.0), (0.5, 0.9)])]
    tokens = choose(logits, rows)
    assert tokens[0] == logits[0].float().argmax() and tokens[1] == logits[1].argmax()
    assert 0 <= tokens[2] < 1000


def test_prefills_failing_again_and_again_stop_the_engine(gen):
    engine = Engine(gen)
    sinks = []
    gen.model.prefill = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        for i in range(3):  # MAX_FAILED_STEPS
            assert engine.failure is None
            req, sink = request(gen, f"prompt {i}")
            sinks.append(sink)
            engine.submit(req)
            engine.step()
    finally:
        del gen.model.prefill
    assert [s.finished.reason for s in sinks] == ["error"] * 3
    assert engine.failure is not None and "boom" in engine.failure
    with pytest.raises(Unavailable):
        engine.submit(request(gen, "Hello")[0])


def test_a_failing_decode_fails_its_requests_and_stops_the_engine(gen):
    engine = Engine(gen)
    failures = []
    engine.on_failure = failures.append
    req, sink = request(gen, "Hello")
    engine.submit(req)
    engine.step()
    step = gen.decode_step
    type(step).__call__, original = (lambda self, *a: (_ for _ in ()).throw(RuntimeError("boom"))), \
        type(step).__call__
    try:
        engine.step()
    finally:
        type(step).__call__ = original
    assert sink.finished.reason == "error" and "boom" in sink.finished.message
    assert "boom" in engine.failure and failures == [engine.failure]
    with pytest.raises(Unavailable):
        engine.submit(request(gen, "Hello")[0])


# --- model parallel --------------------------------------------------------------------------------------

WORKER = r'''
import json, sys
from llama import Llama
from llama.model.distributed import Broadcast
from llama.serve import Engine, Request, SamplingParams, Chunk
from llama.engine import Runner, follow

out, ckpt, tok = sys.argv[1:4]
g = Llama.build(ckpt, tok, max_seq_len=96, max_batch_size=4, device="cpu", dtype="float32")
channel = Broadcast()
if channel.rank != 0:
    follow(g.decode_step, channel)
    sys.exit(0)
engine = Engine(g, runner=Runner(g.decode_step, channel))
prompts = json.loads(sys.argv[4])
results = [[] for _ in prompts]
for i, p in enumerate(prompts):
    params = SamplingParams(max_tokens=4 + 3 * i, temperature=0.8 if i % 3 == 2 else 0.0, seed=i)
    engine.submit(Request(g.tokenizer.encode(p, bos=True, eos=False), params,
                          lambda e, i=i: results[i].append(e.text if isinstance(e, Chunk) else e.reason)))
engine.start()
engine.stop(timeout=120)
with open(out, "w", encoding="utf-8") as handle:
    json.dump(results, handle)
'''


def test_model_parallel_engine_gives_the_single_process_answers(tmp_path, random_dir, gen):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    mp_dir = make_checkpoint(tmp_path / "mp2", MHA, n_shards=2, seed=7)
    prompts = PROMPTS + PROMPTS[:3]
    proc = run_torchrun(worker, [str(tmp_path / "out.json"), str(mp_dir), str(TOKENIZER), json.dumps(prompts)],
                        nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    engine = Engine(gen)
    expected: List[List] = [[] for _ in prompts]
    reqs = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=4 + 3 * i, temperature=0.8 if i % 3 == 2 else 0.0, seed=i)
        reqs.append(Request(gen.tokenizer.encode(p, bos=True, eos=False), params,
                            lambda e, i=i: expected[i].append(e.text if isinstance(e, Chunk) else e.reason)))
    run(engine, reqs)
    assert ["".join(x[:-1]) for x in got] == ["".join(x[:-1]) for x in expected]
    assert [x[-1] for x in got] == [x[-1] for x in expected]
