"""Chunked prefill: a prompt longer than the engine's token budget is prefilled over several steps, interleaved
with the running rows' decode steps, with the answers and log-probs of a whole prefill; a short prompt that
arrives behind a long one starts before the long one's prefill ends."""

from __future__ import annotations

import random

import pytest
import torch

from llama import Llama
from llama.engine import Chunk, Engine, Request, SamplingParams

from helpers import TOKENIZER, make_checkpoint
from test_engine import SHAPE, Collect, run


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Llama:
    folder = make_checkpoint(tmp_path_factory.mktemp("chunked"), SHAPE, seed=13)
    return Llama.build(str(folder), str(TOKENIZER), max_seq_len=160, max_batch_size=4, device="cpu",
                       dtype="float32")


def engine(gen: Llama, budget) -> Engine:
    return Engine(gen.decode_step, gen.tokenizer, gen.stop_ids, max_prefill_tokens=budget, fixed_shape=False)


def long_prompt(n: int, seed: int):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 32000) for _ in range(n - 1)]


PARAMS = SamplingParams(max_tokens=12, temperature=0, logprobs=0, stop_token_ids=())


@pytest.mark.parametrize("budget", [7, 16, 33])
def test_chunked_answers_equal_a_whole_prefill(gen, budget):
    prompts = [long_prompt(100, 1), long_prompt(9, 2), long_prompt(57, 3)]
    results = {}
    for name, b in (("whole", None), ("chunked", budget)):
        sinks = [Collect() for _ in prompts]
        run(engine(gen, b), [Request(p, PARAMS, s) for p, s in zip(prompts, sinks)])
        results[name] = [(s.tokens(), [e.logprob for c in s.events if isinstance(c, Chunk) for e in c.logprobs])
                         for s in sinks]
    for (tokens, lps), (ref_tokens, ref_lps) in zip(results["chunked"], results["whole"]):
        assert tokens == ref_tokens
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4, rtol=0)


def test_running_rows_decode_while_a_long_prompt_is_chunked_and_short_ones_go_first(gen):
    e = engine(gen, 16)
    running = Collect()
    e.add(Request(long_prompt(5, 4), SamplingParams(max_tokens=60, temperature=0, stop_token_ids=()), running))
    e.step()
    assert len(running.tokens()) == 1
    long_sink, short_sink = Collect(), Collect()
    e.add(Request(long_prompt(120, 5), SamplingParams(max_tokens=2, temperature=0), long_sink))
    e.add(Request(long_prompt(6, 6), SamplingParams(max_tokens=2, temperature=0), short_sink))
    steps = 0
    while not long_sink.tokens():
        e.step()
        steps += 1
        assert len(running.tokens()) == 1 + steps  # a token every step: the long prefill never stalls it
        assert steps < 40
    assert steps >= 120 // 16  # the long prompt took several steps
    assert short_sink.tokens() and short_sink.finished() is not None  # done before the long one's first token
