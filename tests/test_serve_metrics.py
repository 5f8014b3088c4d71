"""Operations: Prometheus /metrics (read with prometheus-client's own parser) and X-Request-ID."""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from llama import Llama

from helpers import MHA, TOKENIZER, make_checkpoint
from serve_support import TIMEOUT, ThreadServer

parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("metrics"), MHA, seed=3)
    gen = Llama.build(str(folder), str(TOKENIZER), max_seq_len=128, max_batch_size=3, device="cpu", dtype="float32")
    with ThreadServer(gen, model="m") as s:
        yield s


def scrape(server) -> dict:
    r = httpx.get(server.url + "/metrics", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in parser.text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_tokens_and_latencies(server):
    before = scrape(server)
    client = server.openai()
    answers = [client.completions.create(model="m", prompt=p, max_tokens=6, temperature=0, stop=[])
               for p in ("Hello there", "One two three four")]
    stream = list(client.completions.create(model="m", prompt="x", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    bad = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": 5}, timeout=TIMEOUT)
    assert bad.status_code == 400
    after = scrape(server)
    delta = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0) - \
        before.get((name, tuple(sorted(labels.items()))), 0)
    usages = [a.usage for a in answers] + [stream[-1].usage]
    assert delta("llama_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("llama_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("llama_time_to_first_token_seconds_count") == 3
    assert delta("llama_inter_token_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    reasons = {r: delta("llama_requests_finished_total", reason=r) for r in ("stop", "length")}
    assert sum(reasons.values()) == 3
    assert delta("llama_http_requests_total", path="/v1/completions", status="200") == 3
    assert delta("llama_http_requests_total", path="/v1/completions", status="400") == 1
    assert after[("llama_queue_depth", ())] == 0 and after[("llama_kv_rows_in_use", ())] == 0
    assert after[("llama_kv_rows_total", ())] == 3
    assert after[("llama_requests_running", ())] == 0 and after[("llama_requests_waiting", ())] == 0
    pool = server.engine.engine.pool
    assert after[("llama_kv_blocks_total", ())] == pool.usable == 3 * 128 // 16
    assert after[("llama_kv_blocks_in_use", ())] == pool.in_use  # (short answers: no full block to keep)
    assert after[("llama_preemptions_total", ())] == 0


def test_a_small_pool_preempts_and_every_answer_equals_its_answer_alone(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from llama.model.kv_cache import pool_bytes_per_block

    import torch

    folder = make_checkpoint(tmp_path, MHA, seed=5)
    per_block = pool_bytes_per_block(MHA.n_layers, MHA.kv_heads, MHA.head_dim, torch.float32)
    gen = Llama.build(str(folder), str(TOKENIZER), max_seq_len=128, max_batch_size=4, device="cpu",
                      dtype="float32", kv_cache_gib=9 * per_block / 2 ** 30, prefix_cache=False)  # 8 blocks
    prompts = ["Once upon a time", "The quick brown fox", "In a hole in the ground", "It was a bright cold day"]
    with ThreadServer(gen, model="m") as s:
        client = s.openai()
        ask = lambda p: client.completions.create(model="m", prompt=p, max_tokens=40, temperature=0, stop=[],
                                                  seed=1).choices[0].text
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, prompts))
        after = scrape(s)
        health = httpx.get(s.url + "/health", timeout=TIMEOUT).json()
        alone = [ask(p) for p in prompts]
    assert after[("llama_preemptions_total", ())] > 0
    assert together == alone
    assert health["running"] == 0 and health["waiting"] == 0 and health["kv_blocks_total"] == 8


def _logged(caplog, wanted) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while not any(wanted(m) for m in caplog.messages):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_request_id_is_echoed_and_logged(server, caplog):
    caplog.set_level(logging.INFO, logger="llama.serve")
    r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                   headers={"X-Request-ID": "trace-42.a"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a"
    # The access line is written once the response is sent (its time counts the sending), so the server's thread
    # may write it a moment after the client has read the answer: wait for it, up to TIMEOUT.
    assert _logged(caplog, lambda m: "trace-42.a" in m and "/v1/completions -> 200" in m)
    odd = httpx.get(server.url + "/health", headers={"X-Request-ID": "bad id\twith spaces"}, timeout=TIMEOUT)
    made = odd.headers["x-request-id"]
    assert made != "bad id\twith spaces" and len(made) == 32  # a new one: odd text never reaches the log
    assert httpx.get(server.url + "/nowhere", timeout=TIMEOUT).headers["x-request-id"]


def test_requests_are_counted_by_the_route_the_app_declares(server):
    # The labels come from the app's own routes (one list: api.py's), so new routes need no second list.
    before = scrape(server)
    assert httpx.get(server.url + "/nowhere/at/all", timeout=TIMEOUT).status_code == 404
    assert httpx.get(server.url + "/v1/models/m", timeout=TIMEOUT).status_code == 200
    after = scrape(server)
    delta = lambda **labels: after.get(("llama_http_requests_total", tuple(sorted(labels.items()))), 0) - \
        before.get(("llama_http_requests_total", tuple(sorted(labels.items()))), 0)
    assert delta(path="other", status="404") == 1
    assert delta(path="/v1/models/{name:path}", status="200") == 1
