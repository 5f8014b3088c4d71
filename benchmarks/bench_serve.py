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
from llama.checkpoint import random_state, split_state, write_checkpoint  # noqa: E402
from llama.model import count_parameters  # noqa: E402

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

    def __init__(self, ckpt: str, tokenizer: str, batch: int, max_seq_len: int, threads: int, dtype: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama.serve", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer, "--port", "0",
             "--max_batch_size", str(batch), "--max_seq_len", str(max_seq_len), "--max_queue", "256",
             "--dtype", dtype, "--model", "bench", "--log_level", "warning"],
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


def random_checkpoint(spec: str, folder: Path) -> Dict[str, Any]:
    dim, layers, heads = (int(x) for x in spec.split(","))
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, vocab_size=32000, multiple_of=256)
    write_checkpoint(folder, args.to_params(vocab_size=-1), split_state(random_state(args, seed=0), 1))
    return {"random": spec, "parameters": count_parameters(args)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir")
    parser.add_argument("--tokenizer_path")
    parser.add_argument("--random", help="dim,layers,heads of a random checkpoint (vocab 32000)")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent streams to measure")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (the same ones each time)")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None,
                        help="max_batch_size of every server (default: each level's concurrency)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
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
    flags, cpu = "", platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text().splitlines()
        line = next((ln for ln in info if ln.startswith("flags")), "")
        flags = " ".join(f for f in line.split() if f.startswith(("avx", "amx", "fma", "f16c")))
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    print(json.dumps({"model": model, "device": "cpu", "dtype": args.dtype, "server_threads": args.threads,
                      "cpu": cpu, "cores": os.cpu_count(),
                      "cpu_flags": flags, "torch": torch.__version__, "max_tokens": args.max_tokens,
                      "requests_per_level": args.requests, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
