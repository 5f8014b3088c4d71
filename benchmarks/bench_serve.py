"""Serving throughput and latency at 1, 4, 16 and 64 concurrent streams, against one request at a time.

For each concurrency C the benchmark starts `python -m llama.serve --max_batch_size C` on 127.0.0.1 (a
subprocess, so the clients do not share its interpreter), then streams the same --requests completions through
it with C clients at a time (httpx, server-sent events), and reports:
  tokens_per_s   completion tokens of all requests / wall time from the first request to the last answer
  ttft_p50/p99   seconds from sending a request to its first streamed text
  itl_p50/p99    seconds between two streamed chunks of one answer (a chunk is one token, except where a
                 multi-byte character spans several)
The C=1 run is "served one at a time" (a max_batch_size 1 server, the best setup for that); `speedup` is each
run's tokens_per_s over it. --batch N serves every level from a max_batch_size N server instead, as one
deployment would. Prompts are ragged (8 to 64 tokens), answers greedy with max_tokens each, so every
run produces the same tokens.

    python benchmarks/bench_serve.py                       # the demo model
    python benchmarks/bench_serve.py --random 512,8,8      # a random checkpoint: dim, layers, heads (vocab 32000)
    python benchmarks/bench_serve.py --ckpt_dir D --tokenizer_path T --levels 1,16

--prefill_stall measures something else: how long running streams stall while long prompts arrive. Two
servers run side by side, one with --max_prefill_tokens 0 (no limit: every waiting prompt is prefilled in one
step) and one with the default budget, which prefills a prompt longer than it in chunks interleaved with the
decode steps (chunked prefill); trials alternate between them. In each trial --streams streams are
running when --long_prompts prompts of about --long_tokens tokens arrive at once; the gaps between the running
streams' chunks from the burst's start until every long prompt has its first token are what count. Reported
per server: the medians over trials of those gaps' p50, p99 (and p99 / p50: the target is <= 3) and maximum, and of the time to the burst's last first
token (what the budget costs the newcomers).

    python benchmarks/bench_serve.py --prefill_stall                  # the demo model, 7 prompts of 2000 tokens

--shared_prefix measures the prefix cache: two servers run side by side, one with the prefix cache (the default)
and one with --no-prefix-cache; rounds alternate between them. Each round makes a new prefix of --prefix_tokens
tokens (1000 by default: a long system prompt or document) and sends, one after the other, a first request
(prefix + a question: the cache is cold), a second (prefix + another question: its prefix is cached, on the
first server) and then --followers requests sharing it at once. Reported per server, medians over rounds: the
first and second requests' time to first token and their ratio (the target: the second at least 5x sooner with
the cache), and over the followers their time to first token and inter-token p50/p99 and tokens/s.

    python benchmarks/bench_serve.py --shared_prefix --shape 1.1B --dtype bfloat16     # the README's figure

Prints one JSON object. The server gets OMP_NUM_THREADS=--threads (default 1: on a small shared machine more
threads than free cores make every step wait for the slowest one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama  # noqa: E402,F401  (before torch: the OpenMP wait policy, an emulated CPU's compile cache)
import torch  # noqa: E402

from llama import ModelArgs  # noqa: E402
from llama.checkpoints.checkpoint import random_state, split_state, write_checkpoint  # noqa: E402
from llama.model import PRESETS, count_parameters  # noqa: E402

DEMO = ROOT / "demo" / "fortune-llama"
TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer.model"
WORDS = ("the a fool and his money are soon parted but wise man knows when to hold tongue for every one who "
         "asks shall receive time waits no it is better light candle than curse darkness").split()


def prompts(n: int, seed: int = 0) -> List[str]:
    """n ragged prompts, about 8 to 64 tokens each."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 50))) for _ in range(n)]


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Server:
    """`python -m llama.serve` on a free loopback port, until stop()."""

    def __init__(self, ckpt: str, tokenizer: str, batch: int, max_seq_len: int, threads: int, dtype: str,
                 extra: Sequence[str] = ()) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama.serve", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer, "--port", "0",
             "--max_batch_size", str(batch), "--max_seq_len", str(max_seq_len), "--max_queue", "256",
             "--dtype", dtype, "--model", "bench", "--log_level", "warning", *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            match = re.search(r"Serving .* on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                return
        raise RuntimeError(f"the server exited with status {self.proc.wait()} before serving")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Dict[str, Any]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times: List[float] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event["choices"]):
                times.append(time.perf_counter())
    return {"ttft": times[0] - start if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens}


async def run_level(url: str, texts: List[str], concurrency: int, max_tokens: int) -> Dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    # TCP_NODELAY: without it the request body waits for the server's delayed ACK of the headers (40 ms).
    transport = httpx.AsyncHTTPTransport(limits=limits,
                                         socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(timeout=600, transport=transport) as client:
        await one(client, url, texts[0], 4)  # warm up the connection and the model
        queue = list(enumerate(texts))
        results: List[Dict[str, Any]] = [{} for _ in texts]

        async def worker() -> None:
            while queue:
                i, text = queue.pop(0)
                results[i] = await one(client, url, text, max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(texts), "completion_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": _r(percentile(ttfts, 50)), "ttft_p99_s": _r(percentile(ttfts, 99)),
            "itl_p50_s": _r(percentile(gaps, 50)), "itl_p99_s": _r(percentile(gaps, 99))}


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


def long_prompt(tokenizer: str, n_tokens: int, seed: int) -> str:
    """A prompt of about n_tokens tokens (BOS included) for this tokenizer."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.Load(tokenizer)
    rng = random.Random(seed)
    words: List[str] = []
    while len(sp.encode(" ".join(words))) + 1 < n_tokens:
        words += [rng.choice(WORDS) for _ in range(max(1, (n_tokens - len(sp.encode(" ".join(words)))) // 2))]
    while len(sp.encode(" ".join(words))) + 1 > n_tokens:
        words.pop()
    return " ".join(words)


async def stall_trial(url: str, streams: int, longs: List[str], stream_tokens: int) -> Dict[str, float]:
    """One trial: `streams` streams run, then the long prompts arrive at once. The running streams' chunk gaps
    that end between the burst's start and the last long prompt's first token: their p99 and maximum."""
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
                                         socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(timeout=600, transport=transport) as client:
        await one(client, url, "warm up", 2)
        times: List[List[float]] = [[] for _ in range(streams)]
        started = asyncio.Event()

        async def running(i: int) -> None:
            body = {"model": "bench", "prompt": f"stream {i}: a wise man", "max_tokens": stream_tokens,
                    "temperature": 0, "stream": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]" and \
                            any(c.get("text") for c in json.loads(line[6:])["choices"]):
                        times[i].append(time.perf_counter())
                        if all(len(t) >= 8 for t in times):
                            started.set()

        tasks = [asyncio.create_task(running(i)) for i in range(streams)]
        await asyncio.wait_for(started.wait(), 600)
        burst = time.perf_counter()
        firsts = await asyncio.gather(*(one(client, url, text, 1) for text in longs))
        end = burst + max(r["ttft"] for r in firsts)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if burst < b <= end + 1e-3 or a < end < b]
    return {"gap_p50_s": percentile(gaps, 50) or 0.0, "gap_p99_s": percentile(gaps, 99) or 0.0,
            "gap_max_s": max(gaps, default=0.0),
            "last_ttft_s": end - burst, "gaps": len(gaps)}


def prefill_stall(args: argparse.Namespace, ckpt: str, tokenizer: str) -> Dict[str, Any]:
    """The --prefill_stall comparison (see the module docstring): unlimited prefill against the default budget,
    trials alternating between two servers that run side by side."""
    from statistics import median

    from llama.serve.limits import MAX_PREFILL_TOKENS

    longs = [long_prompt(tokenizer, args.long_tokens, seed) for seed in range(args.long_prompts)]
    seq = args.long_tokens + args.stream_tokens + 64
    batch = args.streams + args.long_prompts
    setups = {"unlimited": ["--max_prefill_tokens", "0"], f"default_{MAX_PREFILL_TOKENS}": []}
    servers = {name: Server(ckpt, tokenizer, batch, seq, args.threads, args.dtype, extra)
               for name, extra in setups.items()}
    trials: Dict[str, List[Dict[str, float]]] = {name: [] for name in setups}
    try:
        for trial in range(args.trials):
            for name in (list(setups) if trial % 2 == 0 else list(reversed(setups))):
                result = asyncio.run(stall_trial(servers[name].url, args.streams, longs, args.stream_tokens))
                trials[name].append(result)
                print(json.dumps({"server": name, "trial": trial, **{k: _r(v) for k, v in result.items()}}),
                      file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return {name: {"max_prefill_tokens": "none" if name == "unlimited" else MAX_PREFILL_TOKENS,
                   "running_gap_p50_s": _r(median(r["gap_p50_s"] for r in runs)),
                   "running_gap_p99_s": _r(median(r["gap_p99_s"] for r in runs)),
                   "p99_over_p50": _r(median(r["gap_p99_s"] / max(r["gap_p50_s"], 1e-9) for r in runs)),
                   "running_gap_max_s": _r(median(r["gap_max_s"] for r in runs)),
                   "burst_last_first_token_s": _r(median(r["last_ttft_s"] for r in runs))}
            for name, runs in trials.items()} | {"streams": args.streams, "long_prompts": args.long_prompts,
                                                  "long_tokens": args.long_tokens, "trials": args.trials}


async def prefix_round(url: str, prefix: str, followers: int, max_tokens: int) -> Dict[str, Any]:
    """One --shared_prefix round on one server (see the module docstring)."""
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
                                         socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(timeout=1200, transport=transport) as client:
        await one(client, url, "warm up", 2)
        first = await one(client, url, prefix + " question: who are you", max_tokens)
        second = await one(client, url, prefix + " question: where is it", max_tokens)
        start = time.perf_counter()
        rest = await asyncio.gather(*(one(client, url, f"{prefix} question {i}: why", max_tokens)
                                      for i in range(followers)))
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in rest if r["ttft"] is not None]
    gaps = [g for r in rest for g in r["gaps"]]
    return {"first_ttft_s": first["ttft"], "second_ttft_s": second["ttft"],
            "first_over_second": first["ttft"] / second["ttft"],
            "followers_ttft_p50_s": percentile(ttfts, 50), "followers_ttft_p99_s": percentile(ttfts, 99),
            "followers_itl_p50_s": percentile(gaps, 50), "followers_itl_p99_s": percentile(gaps, 99),
            "followers_tokens_per_s": sum(r["tokens"] for r in rest) / wall}


def shared_prefix(args: argparse.Namespace, ckpt: str, tokenizer: str) -> Dict[str, Any]:
    """The --shared_prefix comparison: the prefix cache on against off, rounds alternating between two servers
    that run side by side; medians over rounds."""
    from statistics import median

    seq = args.prefix_tokens + args.max_tokens + 64
    setups = {"prefix_cache_on": [], "prefix_cache_off": ["--no-prefix-cache"]}
    servers = {name: Server(ckpt, tokenizer, args.followers, seq, args.threads, args.dtype, extra)
               for name, extra in setups.items()}
    rounds: Dict[str, List[Dict[str, Any]]] = {name: [] for name in setups}
    try:
        for r in range(args.rounds):
            prefix = long_prompt(tokenizer, args.prefix_tokens, seed=100 + r)  # new each round: the first is cold
            for name in (list(setups) if r % 2 == 0 else list(reversed(setups))):
                result = asyncio.run(prefix_round(servers[name].url, prefix, args.followers, args.max_tokens))
                rounds[name].append(result)
                print(json.dumps({"server": name, "round": r, **{k: _r(v) for k, v in result.items()}}),
                      file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    out: Dict[str, Any] = {name: {key: _r(median(x[key] for x in runs)) for key in runs[0]}
                           for name, runs in rounds.items()}
    on, off = out["prefix_cache_on"], out["prefix_cache_off"]
    out["second_ttft_speedup_on_over_off"] = _r(off["second_ttft_s"] / on["second_ttft_s"])
    return out | {"prefix_tokens": args.prefix_tokens, "followers": args.followers, "rounds": args.rounds,
                  "max_tokens": args.max_tokens}


def random_checkpoint(spec: str, folder: Path) -> Dict[str, Any]:
    """A random checkpoint: "dim,layers,heads" (vocab 32000) or a shape's name in PRESETS (1.1B...)."""
    if spec in PRESETS:
        args = ModelArgs(**PRESETS[spec])
    else:
        dim, layers, heads = (int(x) for x in spec.split(","))
        args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, vocab_size=32000, multiple_of=256)
    write_checkpoint(folder, args.to_params(vocab_size=-1), split_state(random_state(args, seed=0), 1))
    return {"random": spec, "parameters": count_parameters(args)}


def machine() -> Dict[str, Any]:
    """The CPU's name, core count and vector flags (what README's figures name)."""
    flags, cpu = "", platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text().splitlines()
        line = next((ln for ln in info if ln.startswith("flags")), "")
        flags = " ".join(f for f in line.split() if f.startswith(("avx", "amx", "fma", "f16c")))
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": flags, "date": time.strftime("%Y-%m-%d")}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir")
    parser.add_argument("--tokenizer_path")
    parser.add_argument("--random", help="dim,layers,heads of a random checkpoint (vocab 32000)")
    parser.add_argument("--shape", choices=sorted(PRESETS), help="a random checkpoint of this shape (1.1B...)")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent streams to measure")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (the same ones each time)")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None,
                        help="max_batch_size of every server (default: each level's concurrency)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill_stall", action="store_true",
                        help="measure running streams' stalls while long prompts arrive (see the docstring)")
    parser.add_argument("--streams", type=int, default=2, help="--prefill_stall: streams running")
    parser.add_argument("--long_prompts", type=int, default=7, help="--prefill_stall: prompts arriving at once")
    parser.add_argument("--long_tokens", type=int, default=2000, help="--prefill_stall: tokens per long prompt")
    parser.add_argument("--stream_tokens", type=int, default=400, help="--prefill_stall: running streams' max_tokens")
    parser.add_argument("--trials", type=int, default=4, help="--prefill_stall: trials per server, alternating")
    parser.add_argument("--shared_prefix", action="store_true",
                        help="measure the prefix cache, on against off (see the docstring)")
    parser.add_argument("--prefix_tokens", type=int, default=1000, help="--shared_prefix: tokens of the prefix")
    parser.add_argument("--followers", type=int, default=4,
                        help="--shared_prefix: requests sharing the prefix sent at once after the second")
    parser.add_argument("--rounds", type=int, default=4, help="--shared_prefix: rounds per server, alternating")
    args = parser.parse_args(argv)
    if args.shape:
        args.random = args.shape
    levels = [int(x) for x in args.levels.split(",")]
    tmp = tempfile.TemporaryDirectory()
    if args.random:
        model = random_checkpoint(args.random, Path(tmp.name))
        ckpt, tokenizer = tmp.name, str(TOKENIZER)
    else:
        ckpt, tokenizer = args.ckpt_dir or str(DEMO), args.tokenizer_path or str(DEMO / "tokenizer.model")
        params = json.loads((Path(ckpt) / "params.json").read_text())
        params["vocab_size"] = params.get("vocab_size", -1) if params.get("vocab_size", -1) > 0 else 32000
        model = {"ckpt_dir": ckpt, "parameters": count_parameters(ModelArgs.from_params(params))}
    if args.shared_prefix:
        print(json.dumps({"model": model, "device": "cpu", "dtype": args.dtype, "server_threads": args.threads,
                          **machine(), "torch": torch.__version__,
                          "shared_prefix": shared_prefix(args, ckpt, tokenizer)}, indent=1))
        return
    if args.prefill_stall:
        print(json.dumps({"model": model, "device": "cpu", "dtype": args.dtype, "server_threads": args.threads,
                          **machine(), "torch": torch.__version__,
                          "prefill_stall": prefill_stall(args, ckpt, tokenizer)}, indent=1))
        return
    texts = prompts(args.requests)
    runs = []
    for level in levels:
        batch = args.batch or level
        server = Server(ckpt, tokenizer, batch, args.max_seq_len, args.threads, args.dtype)
        try:
            runs.append({"max_batch_size": batch, **asyncio.run(run_level(server.url, texts, level, args.max_tokens))})
        finally:
            server.stop()
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    base = next((r["tokens_per_s"] for r in runs if r["concurrency"] == 1), None)
    for r in runs:
        r["speedup"] = round(r["tokens_per_s"] / base, 2) if base else None
    print(json.dumps({"model": model, "device": "cpu", "dtype": args.dtype, "server_threads": args.threads,
                      **machine(), "torch": torch.__version__, "max_tokens": args.max_tokens,
                      "requests_per_level": args.requests, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
