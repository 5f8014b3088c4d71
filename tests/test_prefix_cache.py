"""The prefix cache: its block table (chained keys, hits, misses, LRU eviction), answers and log-probs equal with
it on and off in float32 (and the log-probs of a request served from cached blocks equal transformers'), a
multi-turn chat that hits, requests it must not serve from the cache, its flags, and its /metrics."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

from llama import Llama
from llama.checkpoints.checkpoint import random_state
from llama.engine import Chunk, Engine, Request, SamplingParams
from llama.engine.prefix_cache import PrefixCache, block_keys, cache_blocks

from helpers import TOKENIZER, make_checkpoint
from test_engine import SHAPE, Collect, run

BS = 16


def tokens(n: int, seed: int):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 32000) for _ in range(n - 1)]


# --- the block table -----------------------------------------------------------------------------------------


def cached(table: PrefixCache, seq) -> list:
    """A sequence's blocks for every full block of seq, kept by the cache once written, as the engine does when
    a prompt's prefill has run; then the sequence ends (the cache alone holds them)."""
    blocks = [table.pool.allocate() for _ in range(len(seq) // BS)]
    table.insert(seq, blocks)
    for block in blocks:
        table.pool.unref(block)
    return blocks


def test_a_hit_needs_the_whole_prefix_and_leaves_the_last_token_out():
    table = PrefixCache(8, BS)
    seq = tokens(3 * BS, 0)
    assert table.lookup(seq) == [] and table.hits == 0 and table.queries == 3 * BS
    blocks = cached(table, seq)
    assert len(blocks) == 3 and table.pool.in_use == 3
    assert table.lookup(seq) == blocks[:2]  # the third block would leave no token to compute logits for
    assert table.lookup(seq + [5]) == blocks  # one more token: all three
    assert table.lookup(seq[:BS + 3]) == blocks[:1]
    other_start = [2] + seq[1:]  # the same later blocks after a different first block: no hit at all
    assert table.lookup(other_start + [5]) == []
    changed = seq[:BS] + [7] + seq[BS + 1:] + [5]  # the second block differs: only the first hits
    assert table.lookup(changed) == blocks[:1]
    assert table.hits == (2 + 3 + 1 + 0 + 1) * BS
    assert table.in_use == 3 and table.stats()["prefix_cache_blocks_total"] == 8


def test_keys_are_chained_over_every_earlier_token():
    a, b = tokens(2 * BS, 1), tokens(2 * BS, 2)
    mixed = a[:BS] + b[BS:]
    assert block_keys(a, 2, BS)[0] == block_keys(mixed, 2, BS)[0]
    assert block_keys(b, 2, BS)[1] != block_keys(mixed, 2, BS)[1]  # same tokens in block 1, other prefix


def test_lru_eviction_drops_the_least_recently_used_prefix_from_its_end():
    table = PrefixCache(4, BS)
    first, second = tokens(2 * BS, 3), tokens(2 * BS, 4)
    cached(table, first)
    cached(table, second)
    assert table.in_use == 4
    assert len(table.lookup(first + [9])) == 2  # first is now the most recently used
    third = tokens(BS, 5)
    cached(table, third)  # evicts second's last block: second's first block still hits
    assert len(table.lookup(second + [9])) == 1 and len(table.lookup(first + [9])) == 2
    cached(table, tokens(2 * BS, 6))  # two more: the least recently used go (third's, then second's)
    assert table.lookup(third + [9]) == [] and table.lookup(second + [9]) == []
    assert len(table.lookup(first + [9])) == 2 and table.in_use == 4


def test_blocks_a_sequence_holds_are_never_evicted():
    table = PrefixCache(2, BS)
    seq = tokens(2 * BS, 7)
    held = [table.pool.allocate(), table.pool.allocate()]
    table.insert(seq, held)
    assert table.in_use == 2 and table.pool.available() == 0
    assert table.pool.allocate() is None  # the running sequence still holds both: nothing to evict
    assert len(table.lookup(seq + [1])) == 2
    table.pool.unref(held[1])  # the sequence ends: the cache alone keeps its blocks, and they can be evicted
    table.pool.unref(held[0])
    assert table.pool.available() == 2 and table.pool.allocate() == held[1]  # the prefix's end goes first
    assert len(table.lookup(seq + [1])) == 1


def test_cache_size_from_the_memory_bound():
    per_block = 2 * 2 * 2 * 16 * BS * 4
    assert cache_blocks(None, per_block, pool_blocks=50) == 50  # by default the whole pool
    assert cache_blocks(per_block * 10 / 2 ** 30, per_block, 50) == 10
    assert cache_blocks(per_block * 100 / 2 ** 30, per_block, 50) == 50
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="prefix_cache_gib"):
            cache_blocks(bad, per_block, 50)
    with pytest.raises(ValueError, match=r"prefix_cache_gib 1e-09 holds no block"):
        cache_blocks(1e-9, per_block, 50)


# --- the engine: exact with the cache on -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Random weights with a sharpened output layer: a plain random model's next-token distribution is nearly
    flat, so that rounding-level differences could flip which of two near-equal tokens a seeded draw takes."""
    state = random_state(SHAPE, seed=17)
    state["output.weight"] = state["output.weight"] * 12
    return make_checkpoint(tmp_path_factory.mktemp("prefix"), SHAPE, state=state)


def build(ckpt, **options) -> Llama:
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=192, max_batch_size=4, device="cpu",
                       dtype="float32", **options)


@pytest.fixture(scope="module")
def pair(ckpt):
    return build(ckpt), build(ckpt, prefix_cache=False)


SYSTEM = tokens(70, 8)
PROMPTS = [SYSTEM + tokens(k, 20 + k)[1:] for k in (6, 1, 33, 17)] + [SYSTEM[:40], SYSTEM]


def answers(gen: Llama, params: SamplingParams, prompts=PROMPTS, budget=None):
    """Each prompt served after the ones before it: (tokens, log-probs) per choice."""
    out = []
    for prompt in prompts:
        engine = Engine(gen.decode_step, gen.tokenizer, gen.stop_ids, prefix_cache=gen.prefix_cache,
                        max_prefill_tokens=budget)
        sink = Collect()
        run(engine, [Request(list(prompt), params, sink)])
        out.append([(sink.tokens(i), [e.logprob for c in sink.events if isinstance(c, Chunk) and c.index == i
                                      for e in c.logprobs]) for i in range(params.n)])
    return out


@pytest.mark.parametrize("params, budget", [
    (SamplingParams(max_tokens=10, temperature=0, logprobs=0, stop_token_ids=()), None),
    (SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=5, logprobs=0, n=2, stop_token_ids=()), None),
    (SamplingParams(max_tokens=10, temperature=0, logprobs=0, stop_token_ids=()), 20),  # chunked after the hit
], ids=["greedy", "seeded-n2", "chunked"])
def test_answers_and_logprobs_equal_those_without_the_cache(pair, params, budget):
    on, off = pair
    before = on.prefix_cache.hits
    got, expected = answers(on, params, budget=budget), answers(off, params, budget=budget)
    assert on.prefix_cache.hits - before >= 4 * 64  # the later prompts were served from cached blocks
    for choices, ref in zip(got, expected):
        for (toks, lps), (ref_toks, ref_lps) in zip(choices, ref):
            assert toks == ref_toks
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=2e-5, rtol=0)


def test_speculative_decoding_with_cached_prefixes_keeps_the_answers(ckpt, pair):
    spec = build(ckpt, speculative="ngram")
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=0, stop_token_ids=())
    got = answers(spec, params)
    assert spec.prefix_cache.hits > 0
    for (toks, lps), (ref_toks, ref_lps) in zip([c[0] for c in got], [c[0] for c in answers(pair[1], params)]):
        assert toks == ref_toks
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=2e-5, rtol=0)


def test_logprobs_served_from_cached_blocks_equal_transformers(tmp_path):
    pytest.importorskip("transformers")
    from test_parity import meta_to_hf

    state = random_state(SHAPE, seed=19)
    gen = build(make_checkpoint(tmp_path, SHAPE, state=state))
    hf = meta_to_hf(state, SHAPE)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, stop_token_ids=())
    prompt = SYSTEM + [4, 5, 6]
    answers(gen, params, [SYSTEM + [9]])  # caches SYSTEM's full blocks
    hits = gen.prefix_cache.hits
    (toks, lps), = answers(gen, params, [prompt])[0]
    assert gen.prefix_cache.hits - hits == 64
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks).unsqueeze(-1)).squeeze(-1)
    assert toks == logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=0)


def test_a_multi_turn_chat_hits_its_earlier_turns(pair):
    on, off = pair
    dialog = [{"role": "system", "content": "You answer in riddles about the sea and nothing else, ever."},
              {"role": "user", "content": "Tell me where the old lighthouse keeper went last winter."}]
    results = {}
    for name, gen in (("on", on), ("off", off)):
        turns, d = [], list(dialog)
        for question in ("And then?", "Why?"):
            answer = gen.chat_completion([d], temperature=0, max_gen_len=12, logprobs=True)[0]
            turns.append(answer)
            d = d + [answer["generation"], {"role": "user", "content": question}]
        if name == "on":
            hits = gen.prefix_cache.hits
            gen.chat_completion([d], temperature=0, max_gen_len=4)
            assert gen.prefix_cache.hits - hits >= on.dialog_length(d) - 2 * 16 - 16  # all but the newest
        results[name] = turns
    for a, b in zip(results["on"], results["off"]):
        assert a["generation"] == b["generation"]
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=2e-5, rtol=0)


def test_prompt_logprobs_are_computed_whole_and_still_fill_the_cache(pair):
    on, off = pair
    prompt = tokens(50, 30)
    on.generate([prompt + [7]], max_gen_len=1, temperature=0)  # caches prompt's blocks
    queries = on.prefix_cache.queries
    got = on.generate([prompt], max_gen_len=2, temperature=0, logprobs=True, echo=True)
    assert on.prefix_cache.queries == queries  # not looked up: every position's logits are computed
    expected = off.generate([prompt], max_gen_len=2, temperature=0, logprobs=True, echo=True)
    torch.testing.assert_close(torch.tensor(got[1][0]), torch.tensor(expected[1][0]), atol=2e-5, rtol=0)
    fresh = tokens(40, 31)
    on.generate([fresh], max_gen_len=1, temperature=0, logprobs=True, echo=True)
    assert len(on.prefix_cache.lookup(fresh + [3])) == 2


def test_a_prompt_cancelled_mid_prefill_leaves_no_block(ckpt):
    gen = build(ckpt)
    engine = Engine(gen.decode_step, gen.tokenizer, gen.stop_ids, prefix_cache=gen.prefix_cache,
                    max_prefill_tokens=20)
    prompt = tokens(100, 40)
    request = Request(prompt, SamplingParams(max_tokens=4, temperature=0), Collect())
    engine.add(request)
    engine.step()
    engine.step()
    request.cancelled = True
    engine.step()
    assert gen.prefix_cache.in_use == 0 and gen.prefix_cache.lookup(prompt) == []


def test_a_failed_step_makes_no_block_a_hit(ckpt):
    gen = build(ckpt)

    class Failing:
        def run(self, plan):
            raise RuntimeError("boom")

    engine = Engine(gen.decode_step, gen.tokenizer, gen.stop_ids, prefix_cache=gen.prefix_cache,
                    runner=Failing())
    prompt = tokens(50, 41)
    sink = Collect()
    engine.add(Request(prompt, SamplingParams(max_tokens=4, temperature=0), sink))
    engine.step()
    assert sink.finished().reason == "error"
    assert gen.prefix_cache.in_use == 0 and gen.prefix_cache.lookup(prompt) == []


# --- flags -------------------------------------------------------------------------------------------------


def test_off_flag_and_deterministic_mode_run_without_it(pair, ckpt):
    assert pair[1].prefix_cache is None and pair[1].engine.prefix_cache is None
    assert pair[0].prefix_cache is not None and pair[0].engine.prefix_cache is pair[0].prefix_cache
    assert build(ckpt, deterministic=True).prefix_cache is None
    small = build(ckpt, prefix_cache_gib=0.0001)
    assert small.prefix_cache.blocks == int(0.0001 * 2 ** 30 // (2 * 2 * 2 * 16 * 16 * 4))


@pytest.mark.parametrize("options, piece", [
    (dict(prefix_cache_gib=-1), "prefix_cache_gib must be a positive number of GiB (or None: the default size), "
                                "got -1"),
    (dict(prefix_cache_gib="2"), "got '2'"),
    (dict(prefix_cache="yes"), "prefix_cache must be True or False, got 'yes'"),
])
def test_bad_library_values_are_named_before_loading(tmp_path, options, piece):
    with pytest.raises(ValueError) as err:  # the folder does not exist: the check comes first
        Llama.build(str(tmp_path / "missing"), str(TOKENIZER), max_seq_len=64, max_batch_size=1, **options)
    assert piece in str(err.value)


def test_serve_flags(capsys):
    from llama.programs.serve import _check_limits, main, parse_args

    assert parse_args([]).prefix_cache is True and parse_args([]).prefix_cache_gib is None
    assert parse_args(["--no-prefix-cache"]).prefix_cache is False
    assert parse_args(["--prefix_cache_gib", "0.5"]).prefix_cache_gib == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--prefix_cache_gib", "lots"])
    assert "invalid float value: 'lots'" in capsys.readouterr().err
    for bad in ("0", "-2", "nan"):
        with pytest.raises(ValueError, match=f"--prefix_cache_gib must be a positive number of GiB, got {bad}"):
            _check_limits(parse_args(["--prefix_cache_gib", bad]))
    with pytest.raises(ValueError, match="--no-prefix-cache"):
        _check_limits(parse_args(["--prefix_cache_gib", "1", "--no-prefix-cache"]))
    from serve_support import demo_paths

    assert main([*demo_paths(), "--prefix_cache_gib", "-3"]) == 2
    assert "--prefix_cache_gib must be a positive number of GiB, got -3" in capsys.readouterr().err


# --- the server's metrics ----------------------------------------------------------------------------------


def test_metrics_show_the_hit_rate_and_blocks(pair):
    parser = pytest.importorskip("prometheus_client.parser")
    from serve_support import TIMEOUT, ThreadServer

    gen = pair[0]
    with ThreadServer(gen, model="m") as server:
        def scrape():
            text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
            return {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples}

        before = scrape()
        shared = tokens(64, 50)
        body = {"model": "m", "max_tokens": 2, "temperature": 0}
        for tail in ([5, 6], [7, 8, 9]):
            r = httpx.post(server.url + "/v1/completions", json={**body, "prompt": shared + tail}, timeout=TIMEOUT)
            assert r.status_code == 200
        after = scrape()
    queries = after["llama_prefix_cache_queries_total"] - before["llama_prefix_cache_queries_total"]
    hits = after["llama_prefix_cache_hits_total"] - before["llama_prefix_cache_hits_total"]
    assert queries == 66 + 67 and hits == 64
    assert after["llama_prefix_cache_hit_rate"] == pytest.approx(
        after["llama_prefix_cache_hits_total"] / after["llama_prefix_cache_queries_total"])
    assert after["llama_prefix_cache_blocks_in_use"] == gen.prefix_cache.in_use >= 4
    assert after["llama_prefix_cache_blocks_total"] == gen.prefix_cache.blocks


# --- model parallelism: every rank makes the same copies ---------------------------------------------------

MP_WORKER = r'''
import json, sys
from llama import Llama
from llama.model.distributed import Broadcast
from llama.engine import Runner, follow
from llama.serve import Chunk, Request, SamplingParams
from llama.serve.scheduler import Scheduler

out, ckpt, tok = sys.argv[1:4]
prompts = json.loads(sys.argv[4])
g = Llama.build(ckpt, tok, max_seq_len=128, max_batch_size=2, device="cpu", dtype="float32")
channel = Broadcast()
if channel.rank != 0:
    follow(g.decode_step, channel)
    sys.exit(0)
scheduler = Scheduler(g, runner=Runner(g.decode_step, channel))
scheduler.start()
results = [[] for _ in prompts]
for i, p in enumerate(prompts):  # one after the other: each later prompt finds the earlier ones' blocks
    scheduler.submit(Request(p, SamplingParams(max_tokens=6, temperature=0, logprobs=0, stop_token_ids=()),
                             lambda e, i=i: results[i].append([e.tokens, [x.logprob for x in e.logprobs]])
                             if isinstance(e, Chunk) else None))
    assert scheduler.wait_idle(120)
scheduler.stop(timeout=120)
with open(out, "w", encoding="utf-8") as handle:
    json.dump({"results": results, "hits": g.prefix_cache.hits}, handle)
'''


def test_model_parallel_serving_copies_the_same_blocks_on_every_rank(tmp_path, pair):
    from helpers import MHA, run_torchrun

    folder = make_checkpoint(tmp_path / "mp2", MHA, n_shards=2, seed=23)
    worker = tmp_path / "worker.py"
    worker.write_text(MP_WORKER)
    prompts = [SYSTEM + [5, 6], SYSTEM + [7], SYSTEM[:40] + [8, 9, 10]]
    proc = run_torchrun(worker, [str(tmp_path / "out.json"), str(folder), str(TOKENIZER), json.dumps(prompts)],
                        nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert got["hits"] == 64 + 32
    alone = Llama.build(str(folder), str(TOKENIZER), max_seq_len=128, max_batch_size=2, device="cpu",
                        dtype="float32", prefix_cache=False)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, stop_token_ids=())
    for events, expected in zip(got["results"], answers(alone, params, prompts)):
        (ref_tokens, ref_lps), = expected
        assert [t for e in events for t in e[0]] == ref_tokens
        torch.testing.assert_close(torch.tensor([x for e in events for x in e[1]]), torch.tensor(ref_lps),
                                   atol=1e-4, rtol=0)
