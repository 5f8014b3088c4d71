"""What deterministic mode costs: the same requests through the default engine and a deterministic one.

Random weights at a chosen shape (no files). Workloads, each timed in alternation (default, deterministic,
default, ...), medians of the rounds and the median of each round's ratio:
  - batch-1 decode (one request alone),
  - 8 concurrent requests of ragged prompts (prefill + decode, as a server's rows see them),
  - a staggered mix: 8 requests through 4 rows, joining as others finish.
Deterministic mode decodes every row at the whole context's width and prefills each prompt alone, so a request's
tokens never depend on its neighbours; this prints what that costs. Prints JSON.

    python benchmarks/bench_engine.py --shape 1.1B --n_layers 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import llama  # noqa: F401  (before torch: the OpenMP wait policy)
import torch

from llama import cpu
from llama.engine import Engine, Request, SamplingParams
from llama.model.decode_step import DecodeStep
from llama.model import PRESETS, ModelArgs, Transformer
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def random_model(shape: str, n_layers: int, max_seq_len: int, max_batch: int, dtype: torch.dtype) -> Transformer:
    preset = PRESETS[shape]
    args = ModelArgs(**{**preset, "n_layers": n_layers or preset["n_layers"], "max_seq_len": max_seq_len,
                        "max_batch_size": max_batch})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Transformer(args).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, p.shape[-1] ** -0.5) if not name.endswith("norm.weight") else p.fill_(1.0)
    model.prepare(cpu.kernel_for(torch.device("cpu"), dtype))  # the kernels Llama.build picks on this CPU
    model.setup_cache("cpu", dtype)
    return model.eval()


def workload(engine: Engine, prompts, max_tokens: int, rows_at_once: int) -> float:
    """Seconds to run every prompt to max_tokens, at most rows_at_once running together."""
    waiting = [Request(p, SamplingParams(max_tokens=max_tokens, temperature=0), lambda e: None) for p in prompts]
    start = time.perf_counter()
    while waiting or engine.has_work:
        while waiting and engine.free_rows() > 0 and engine.running < rows_at_once:
            engine.add(waiting.pop(0))
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--n_layers", type=int, default=4, help="fewer layers keep the run short")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    dtype = getattr(torch, opts.dtype)
    model = random_model(opts.shape, opts.n_layers, opts.max_seq_len, 8, dtype)
    tokenizer = Tokenizer(ROOT / "tests" / "fixtures" / "llama2-tokenizer.model")
    engines = {"default": Engine(DecodeStep(model, compiled=False), tokenizer, stop_ids=()),
               "deterministic": Engine(DecodeStep(model, compiled=False, full_window=True), tokenizer, stop_ids=(),
                                       deterministic=True)}
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(16, 200))] for _ in range(8)]
    cases = {"batch1_decode": (prompts[:1], 1), "8_concurrent": (prompts, 8), "8_through_4_rows": (prompts, 4)}
    results = {}
    with torch.inference_mode():
        for name, (ps, rows) in cases.items():
            times = {k: [] for k in engines}
            for _ in range(opts.rounds + 1):  # the first round warms up
                for key, engine in engines.items():
                    times[key].append(workload(engine, ps, opts.max_tokens, rows))
            times = {k: v[1:] for k, v in times.items()}
            tokens = len(ps) * opts.max_tokens
            results[name] = {
                "default_tok_s": round(tokens / statistics.median(times["default"]), 1),
                "deterministic_tok_s": round(tokens / statistics.median(times["deterministic"]), 1),
                "median_ratio": round(statistics.median(d / n for d, n in zip(times["default"],
                                                                               times["deterministic"])), 3),
            }
    print(json.dumps({"shape": opts.shape, "n_layers": opts.n_layers, "dtype": opts.dtype,
                      "max_seq_len": opts.max_seq_len, "threads": torch.get_num_threads(),
                      "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))


if __name__ == "__main__":
    main()
