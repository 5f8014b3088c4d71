"""The paged KV cache under the engine: preemption with a pool too small for every request at once (each answer
equals its answer alone), sharing by reference (prefix hits and n > 1 choices copy no full block), a request
that can never fit, the pool's sizes, and block tables against transformers."""

from __future__ import annotations

import pytest
import torch

from helpers import TOKENIZER, make_checkpoint
from llama import Llama
from llama.checkpoint import random_state
from llama.engine import Engine, Request, SamplingParams
from llama.model.kv_cache import BLOCK_SIZE, pool_bytes_per_block

from test_engine import SHAPE, Collect, prompts, run

PER_BLOCK = pool_bytes_per_block(SHAPE.n_layers, SHAPE.kv_heads, SHAPE.head_dim, torch.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Random weights with a sharpened output layer, so that a seeded draw is not decided by rounding."""
    state = random_state(SHAPE, seed=23)
    state["output.weight"] = state["output.weight"] * 12
    return make_checkpoint(tmp_path_factory.mktemp("paged"), SHAPE, state=state)


def build(ckpt, blocks=None, per_block: int = PER_BLOCK, **options) -> Llama:
    """The checkpoint's model on a pool of `blocks` blocks of per_block bytes (None: the default size)."""
    gib = None if blocks is None else (blocks + 1) * per_block / 2 ** 30
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=128, max_batch_size=6, device="cpu", dtype="float32",
                       kv_cache_gib=gib, **options)


@pytest.fixture(scope="module")
def roomy(ckpt):
    return build(ckpt, prefix_cache=False)


def answer(gen: Llama, requests, engine=None):
    engine = engine or Engine(gen.decode_step, gen.tokenizer, gen.stop_ids, prefix_cache=gen.prefix_cache)
    sinks = [r.sink for r in requests]
    run(engine, requests)
    return engine, [[s.tokens(i) for i in range(r.params.n)] for s, r in zip(sinks, requests)]


PARAMS = [SamplingParams(max_tokens=40, temperature=0, stop_token_ids=()),
          SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=7, stop_token_ids=()),
          SamplingParams(max_tokens=30, temperature=0.8, seed=3, n=2, stop_token_ids=())]


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["plain", "prefix-cache"])
def test_preempted_requests_continue_with_the_tokens_they_would_have_had_alone(ckpt, roomy, prefix_cache):
    check_preempted_answers(build(ckpt, blocks=14, prefix_cache=prefix_cache), roomy)


def check_preempted_answers(small: Llama, roomy: Llama) -> None:
    """6 requests on `small`'s pool (14 blocks: 224 positions for 6 requests of up to ~80) preempt each other and
    still give each the tokens it gets alone on `roomy`; then every block is given back."""
    ps = prompts(6, seed=4)
    params = [PARAMS[i % 3] for i in range(6)]
    engine, got = answer(small, [Request(p, q, Collect(), id=str(i)) for i, (p, q) in enumerate(zip(ps, params))])
    assert engine.preemptions > 0 and engine.failure is None
    for p, q, tokens in zip(ps, params, got):
        _, (alone,) = answer(roomy, [Request(p, q, Collect())])
        assert tokens == alone and all(len(t) == q.max_tokens for t in tokens)
    cached = small.prefix_cache.in_use if small.prefix_cache is not None else 0
    assert small.engine.pool.in_use == cached  # all given back


def test_a_prefix_hit_and_n_choices_share_blocks_without_copying_full_ones(ckpt):
    gen = build(ckpt)
    copies = []

    class Watch:
        def __init__(self, runner):
            self.runner = runner

        def run(self, plan):
            copies.extend(plan.copies)
            return self.runner.run(plan)

    prompt = prompts(1, seed=9)[0][:5] * 10  # 50 tokens: 3 full blocks and 2 positions
    engine = Engine(gen.decode_step, gen.tokenizer, gen.stop_ids, prefix_cache=gen.prefix_cache)
    engine.runner = Watch(engine.runner)
    answer(gen, [Request(list(prompt), PARAMS[0], Collect())], engine)
    pool = engine.pool
    in_use = pool.in_use
    assert gen.prefix_cache.in_use == in_use  # the finished answer's full blocks are all kept
    request = Request(list(prompt) + [7], SamplingParams(max_tokens=2, temperature=0.5, n=3, stop_token_ids=()),
                      Collect())
    engine.add(request)
    parent = next(c for c in engine.rows.values() if c.index == 0)
    assert len(parent.blocks) == 4 and pool.in_use == in_use + 1 + 2  # 3 blocks by reference; 1 new, 2 for copies
    engine.step()  # the prefill: the siblings share the 3 full blocks and copy the partly filled last one
    choices = sorted(engine.rows.values(), key=lambda c: c.index)
    assert [c.blocks[:3] for c in choices] == [parent.blocks[:3]] * 3
    assert all(pool.holders(b) == 3 + 1 for b in parent.blocks[:3])  # three choices and the cache
    assert copies == [(parent.blocks[3], c.blocks[3]) for c in choices[1:]]
    while engine.step():
        pass
    assert pool.in_use == gen.prefix_cache.in_use


def test_a_request_that_can_never_fit_is_refused_before_any_work(ckpt):
    small = build(ckpt, blocks=4, prefix_cache=False)  # 64 positions
    with pytest.raises(ValueError, match=r"need 5 KV blocks of 16 positions; the KV pool holds 4 \(64 positions"):
        small.engine.check([1] * 50, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="need 5 KV blocks"):
        small.generate([[1] * 50], max_gen_len=20)
    assert small.generate([[1] * 40], max_gen_len=20, temperature=0)[0]  # 60 positions fit


def test_the_pool_size_follows_kv_cache_gib_and_bad_values_are_named(ckpt, tmp_path, capsys):
    gen = build(ckpt, blocks=30)
    assert gen.model.pool_blocks == 31 and gen.engine.pool.usable == 30
    assert "KV cache: 30 blocks of 16 positions (480 tokens" in capsys.readouterr().out
    default = build(ckpt)
    assert default.model.pool_blocks == 1 + 6 * 128 // BLOCK_SIZE  # what fits, at most max_batch_size contexts
    for bad in (0, -1, float("nan"), "2", True):
        with pytest.raises(ValueError, match="kv_cache_gib must be a positive number of GiB"):
            Llama.build(str(tmp_path / "missing"), str(TOKENIZER), max_seq_len=64, max_batch_size=1, kv_cache_gib=bad)


def test_log_probs_through_scattered_blocks_equal_transformers(tmp_path):
    pytest.importorskip("transformers")
    from test_parity import meta_to_hf

    state = random_state(SHAPE, seed=29)
    gen = build(make_checkpoint(tmp_path, SHAPE, state=state), blocks=40)
    hf = meta_to_hf(state, SHAPE)
    ps = prompts(4, seed=12)
    gen.generate(prompts(5, seed=13), max_gen_len=9, temperature=0)  # blocks given back out of order: the
    # tables below are scattered over the pool
    out, lps = gen.generate(ps, max_gen_len=20, temperature=0, logprobs=True)
    for p, toks, lp in zip(ps, out, lps):
        with torch.no_grad():
            logits = hf(torch.tensor([p + toks])).logits[0, len(p) - 1:-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks).unsqueeze(-1)).squeeze(-1)
        assert toks == logits.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(lp), expected, atol=1e-5, rtol=0)
