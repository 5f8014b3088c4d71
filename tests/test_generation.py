"""Generation semantics: ragged batches, per-row stopping, lengths, echo, sampling and seeds."""

from __future__ import annotations

import pytest
import torch

from llama import Llama
from llama.model.layers import ParallelLinear
from llama.generation import sample_top_p

from helpers import GQA, TOKENIZER, make_checkpoint

MAX_SEQ = 48


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gqa"), GQA, seed=3)


@pytest.fixture(scope="module")
def gen(ckpt):
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=MAX_SEQ, max_batch_size=4, device="cpu",
                       dtype="float32")


def ragged_prompts(n=4):
    # 16, 13, 10, 7 tokens: rows of different lengths, all prefilled in one pass.
    return [[1] + list(range(100 + 31 * i, 100 + 31 * i + 15 - 3 * i)) for i in range(n)]


class CountingModel:
    """Wraps generator.model's prefill and decode step to record each call, optionally rewriting the logits.

    `edit(call_index, logits)` gets the (B, V) next-token logits of call 1 (the prefill), 2, ... and returns
    the logits to use instead."""

    def __init__(self, gen, edit=None):
        self.model, self.edit, self.calls = gen.model, edit, []

    def __enter__(self):
        model, cls = self.model, type(self.model)

        def prefill(prompts, rows=None, all_logits=False):
            self.calls.append(("prefill", len(prompts), sum(len(p) for p in prompts)))
            logits = cls.prefill(model, prompts, rows=rows, all_logits=all_logits)
            return self.edit(len(self.calls), logits) if self.edit and not all_logits else logits

        def decode(tokens, positions, window, *rest):
            self.calls.append(("decode", *tokens.shape))
            logits = cls.decode(model, tokens, positions, window, *rest)
            return self.edit(len(self.calls), logits) if self.edit else logits

        model.prefill, model.decode = prefill, decode
        return self

    def __exit__(self, *exc):
        del self.model.prefill, self.model.decode


def test_ragged_batch_equals_one_prompt_at_a_time(gen):
    prompts = ragged_prompts()
    batch_tokens, batch_lps = gen.generate(prompts, max_gen_len=8, temperature=0, logprobs=True)
    for prompt, toks, lps in zip(prompts, batch_tokens, batch_lps):
        single_toks, single_lps = gen.generate([prompt], max_gen_len=8, temperature=0, logprobs=True)
        assert toks == single_toks[0]
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(single_lps[0]), atol=1e-5, rtol=0)


def test_whole_batch_is_prefilled_in_one_forward_pass(gen):
    prompts = ragged_prompts()
    with CountingModel(gen) as counter:
        gen.generate(prompts, max_gen_len=3, temperature=0)
    # one packed prefill of all 46 prompt tokens (no padding), then one call per further token for the batch
    assert counter.calls == [("prefill", 4, 16 + 13 + 10 + 7), ("decode", 4), ("decode", 4)]


def test_each_row_stops_at_its_own_eos_and_decoding_ends_when_all_have(gen):
    eos = gen.tokenizer.eos_id

    def force_eos(call, logits):  # row 0 says EOS at its 2nd token, row 1 at its 4th, others never
        logits = logits.clone()
        for row, at_call in ((0, 2), (1, 4)):
            if call == at_call:
                logits[row, eos] = 1e4
        for row in (2, 3):
            logits[row, eos] = -1e4
        return logits

    prompts = ragged_prompts()
    with CountingModel(gen, force_eos) as counter:
        tokens, lps = gen.generate(prompts, max_gen_len=5, temperature=0, logprobs=True)
    assert [len(t) for t in tokens] == [1, 3, 5, 5]
    assert all(eos not in t for t in tokens)
    assert [len(x) for x in lps] == [1, 3, 5, 5]
    assert len(counter.calls) == 5  # prefill + 4 decode steps: nothing after the last row's 5th token

    def all_eos(call, logits):
        logits = logits.clone()
        logits[:, eos] = 1e4
        return logits

    with CountingModel(gen, all_eos) as counter:
        tokens, _ = gen.generate(prompts, max_gen_len=20, temperature=0)
    assert tokens == [[], [], [], []] and len(counter.calls) == 1


def test_prompt_plus_generation_never_exceeds_max_seq_len(gen):
    long_prompt = [1] + [500] * (MAX_SEQ - 4)
    tokens, _ = gen.generate([long_prompt, [1, 42]], max_gen_len=10, temperature=0)
    assert len(tokens[0]) <= 3 and len(long_prompt) + len(tokens[0]) <= MAX_SEQ
    full, _ = gen.generate([[1] + [500] * (MAX_SEQ - 1)], max_gen_len=10, temperature=0)
    assert full == [[]]


def test_default_max_gen_len_is_max_seq_len_minus_one(gen):
    (res,) = gen.text_completion(["x"], temperature=0, logprobs=True)
    prompt_len = len(gen.tokenizer.encode("x", bos=True, eos=False))
    assert len(res["logprobs"]) <= MAX_SEQ - prompt_len


def test_echo_returns_prompt_then_generation(gen):
    prompt = [1, 450, 4996, 17354]
    (plain,), _ = gen.generate([prompt], max_gen_len=4, temperature=0)
    (echoed,), (lps,) = gen.generate([prompt], max_gen_len=4, temperature=0, echo=True, logprobs=True)
    assert echoed == prompt + plain
    assert len(lps) == len(echoed) and lps[0] == 0.0 and all(x < 0 for x in lps[1:])
    (res,) = gen.text_completion(["Hello there"], temperature=0, max_gen_len=3, echo=True)
    assert res["generation"].startswith("Hello there")


def test_text_completion_reports_tokens_and_logprobs(gen):
    (res,) = gen.text_completion(["Hello"], temperature=0, max_gen_len=5, logprobs=True)
    assert len(res["tokens"]) == len(res["logprobs"]) > 0
    assert "".join(res["tokens"]).replace(" ", "") == res["generation"].replace(" ", "")
    (plain,) = gen.text_completion(["Hello"], temperature=0, max_gen_len=5)
    assert set(plain) == {"generation"} and plain["generation"] == res["generation"]


def test_sampling_is_reproducible_from_the_seed(ckpt):
    def run(seed):
        g = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=MAX_SEQ, max_batch_size=2, device="cpu",
                        dtype="float32", seed=seed)
        return g.generate(ragged_prompts(2), max_gen_len=10, temperature=1.0, top_p=0.95)[0]

    first, again, other = run(5), run(5), run(6)
    assert first == again
    assert first != other


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = sample_top_p(probs.clone(), 0.7, gen)
    # 0.5 + 0.3 reaches 0.7: only tokens 0 and 1 may be drawn, in ratio 5:3
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - 0.625) < 0.05
    assert set(sample_top_p(probs.clone(), 0.4, gen).tolist()) == {0}


def test_greedy_matches_argmax_of_forward(gen):
    prompt = [1, 306, 4658, 278]
    (toks,), _ = gen.generate([prompt], max_gen_len=3, temperature=0)
    seq = list(prompt)
    for _ in range(3):
        logits = gen.model(torch.tensor([seq]), 0)
        seq.append(int(logits[0, -1].argmax()))
    assert toks == seq[len(prompt):]


def test_fast_cpu_path_gives_the_plain_path_tokens(ckpt):
    """bfloat16 on CPU packs weights for this CPU's kernels by default; greedy tokens equal plain F.linear's."""
    from llama import cpu

    if cpu.linear_path(torch.device("cpu"), torch.bfloat16) == "aten":
        pytest.skip(f"no packed bfloat16 kernels on this CPU: {cpu.describe()}")
    runs = {}
    for fast in (False, True):
        g = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=MAX_SEQ, max_batch_size=4, device="cpu",
                        dtype="bfloat16", fast=fast)
        packed = [m.kernel is not None for m in g.model.modules() if isinstance(m, ParallelLinear)]
        assert packed and all(packed) == fast and any(packed) == fast
        runs[fast] = g.generate(ragged_prompts(), max_gen_len=8, temperature=0, logprobs=True, echo=True)
    assert runs[True][0] == runs[False][0]
    torch.testing.assert_close(torch.tensor(sum(runs[True][1], [])), torch.tensor(sum(runs[False][1], [])),
                               atol=2e-2, rtol=0)


# bfloat16 keeps about 3 significant digits: log-probs near -7 may differ by a few hundredths once the
# compiler fuses and reorders the elementwise work; the tokens must still be the same.
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 6e-2)])
def test_compiled_decode_gives_the_eager_tokens(ckpt, dtype, atol):
    """compile=True (torch.compile of the decode step) changes speed, not results; in bfloat16 on CPU this
    also covers this CPU's packed weights (llama.cpu) inside a compiled graph."""
    runs = {}
    for compile in (False, True):
        g = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=MAX_SEQ, max_batch_size=4, device="cpu",
                        dtype=dtype, compile=compile)
        runs[compile] = g.generate(ragged_prompts(2), max_gen_len=6, temperature=0, logprobs=True)
    assert runs[True][0] == runs[False][0]
    torch.testing.assert_close(torch.tensor(sum(runs[True][1], [])), torch.tensor(sum(runs[False][1], [])),
                               atol=atol, rtol=0)


def test_a_paused_stream_resumes_after_another_call_with_its_own_answer(gen):
    """The engine owns the rows: a paused stream keeps its row while another call runs (it goes on decoding in
    that call's steps) and, resumed, yields exactly what it yields alone."""
    alone = "".join(gen.stream_generate([1, 450, 4996], max_gen_len=20, temperature=0))
    stream = gen.stream_generate([1, 450, 4996], max_gen_len=20, temperature=0)
    first = next(stream)
    other = gen.generate([[1, 42, 43]], max_gen_len=2, temperature=0)
    assert other == gen.generate([[1, 42, 43]], max_gen_len=2, temperature=0)  # undisturbed by the stream
    assert first + "".join(stream) == alone
    assert gen.engine.free_rows() == gen.max_batch_size  # every row is free again


def test_a_closed_stream_frees_its_row(gen):
    stream = gen.stream_generate([1, 450, 4996], max_gen_len=20, temperature=0)
    next(stream)
    stream.close()
    gen.generate([[1, 42, 43]], max_gen_len=2, temperature=0)
    assert gen.engine.free_rows() == gen.max_batch_size


def test_stream_arguments_are_checked_at_the_call(gen):
    with pytest.raises(ValueError, match="temperature"):
        gen.stream_text_completion("hi", temperature=-1)
    with pytest.raises(ValueError, match="max_gen_len"):
        gen.stream_generate([1, 2], max_gen_len=-3)
    with pytest.raises(ValueError, match="dialog"):
        gen.stream_chat_completion([{"role": "assistant", "content": "x"}])
