"""The paged KV cache's figures (issue 31): concurrency on a fixed KV budget, decode speed at batch 1 and 16,
long-context decode, and a prefix hit's time to first token. Prints one JSON object per part.

Random weights at the chosen shape (no checkpoint files). `--part decode`, `long` and `prefix` use only what the
row-cache version of this library had too (Llama over a Transformer, setup_cache, DecodeStep), so the same
script, run with PYTHONPATH at an older tree, gives the before figures: alternate the two (A B A B) and compare
medians.

    python benchmarks/bench_paged.py --part concurrency                 # 48 requests on 4 x 8192 tokens of KV
    python benchmarks/bench_paged.py --part decode --quantize int8      # batch 1 and 16 decode tokens/s
    python benchmarks/bench_paged.py --part long --contexts 1024,10240,102400
    python benchmarks/bench_paged.py --part prefix                      # time to first token, 1000-token prefix
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama  # noqa: E402,F401  (before torch: the OpenMP wait policy)
import torch  # noqa: E402

from llama import Llama, ModelArgs, Tokenizer, Transformer, cpu, quant, quantize  # noqa: E402
from llama.decode_step import DecodeStep  # noqa: E402
from llama.model import PRESETS  # noqa: E402

from common import add_run_options, apply_run_options, timed  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer.model"


def model_at(shape: dict, max_batch: int, max_seq: int, dtype: torch.dtype, quantize_mode, setup=True,
             blocks=None) -> Transformer:
    """Random weights (normal, scaled by fan-in) on the CPU, prepared as Llama.build would."""
    torch.manual_seed(0)
    args = ModelArgs(**{**shape, "max_batch_size": max_batch, "max_seq_len": max_seq})
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, param.shape[-1] ** -0.5)
    if quantize_mode:
        scheme = quant.parse(quantize_mode)
        quantize.quantize_model(model, scheme)
        model.prepare(quantize.kernel_for_quantize(scheme, torch.device("cpu"), dtype, isa="auto"))
    else:
        model.prepare(cpu.kernel_for(torch.device("cpu"), dtype, max_batch=max_batch))
    if setup:
        model.setup_cache("cpu", dtype) if blocks is None else model.setup_cache("cpu", dtype, blocks=blocks)
    return model.eval()


def prompts(n: int, length: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for _ in range(n)]


def decode_part(opts) -> dict:
    """Decode tokens/s through Llama.generate: (n + 1 tokens) minus (1 token), median of `repeat`."""
    shape = PRESETS[opts.shape]
    out = {}
    for bsz in (1, 16):
        model = model_at(shape, bsz, 512, torch.bfloat16, opts.quantize)
        gen = Llama(model, Tokenizer(str(TOKENIZER)))
        gen.engine.stop_ids = frozenset()
        ps = prompts(bsz, opts.prompt, shape["vocab_size"])

        def run(n):
            start = time.perf_counter()
            gen.generate(ps, max_gen_len=n, temperature=0)
            return time.perf_counter() - start
        run(2)
        rates, firsts = [], []
        for _ in range(opts.repeat):
            t1, tn = run(1), run(opts.tokens + 1)
            rates.append(bsz * opts.tokens / (tn - t1))
            firsts.append(t1)
        out[f"batch{bsz}_decode_tok_s"] = round(statistics.median(rates), 2)
        out[f"batch{bsz}_prefill_and_first_token_s"] = round(statistics.median(firsts), 3)
        out[f"batch{bsz}_runs"] = [round(r, 2) for r in rates]
        del gen, model
    return out


def long_part(opts) -> dict:
    """Batch-1 decode steps at a context of N cached positions (their values do not change the cost), through
    the decode step (fused C where the model is on the own kernels, `--plain` for PyTorch's operators)."""
    shape = PRESETS[opts.shape]
    out = {}
    contexts = [int(x) for x in opts.contexts.split(",")]
    model = model_at(shape, 1, max(contexts) + 64, torch.bfloat16, opts.quantize)
    step = DecodeStep(model, compiled=False, fused=False if opts.plain else None)
    out["path"] = "fused C" if step.fused is not None else "PyTorch"
    token = torch.tensor([5])
    for n in contexts:  # the positions below n hold zeros: the cost does not depend on their values
        with torch.inference_mode():
            step(token, [n])
            times = [timed(lambda: step(token, [n])) for _ in range(opts.repeat)]
        out[f"context_{n}_tok_s"] = round(1 / statistics.median(times), 2)
    return out


def prefix_part(opts) -> dict:
    """Time to first token of a request whose 1000-token prefix an earlier request computed, and of the first."""
    shape = PRESETS[opts.shape]
    model = model_at(shape, 4, 2048, torch.bfloat16, opts.quantize)
    gen = Llama(model, Tokenizer(str(TOKENIZER)))
    out = {"first_ttft_s": [], "hit_ttft_s": [], "hit_blocks_copied": []}
    copied = [0]
    if hasattr(model, "copy_blocks"):  # the paged pool: every copy of KV between blocks goes through copy_blocks
        copy = model.copy_blocks
        model.copy_blocks = lambda src, dst: (copied.__setitem__(0, copied[0] + len(src)), copy(src, dst))
    for r in range(opts.repeat):
        prefix = prompts(1, 1000, shape["vocab_size"], seed=100 + r)[0]
        for key, tail in (("first_ttft_s", [5, 6]), ("hit_ttft_s", [7, 8, 9])):
            copied[0] = 0
            start = time.perf_counter()
            gen.generate([prefix + tail], max_gen_len=1, temperature=0)
            out[key].append(round(time.perf_counter() - start, 3))
        out["hit_blocks_copied"].append(copied[0] if hasattr(model, "copy_blocks") else "rows: the prefix is copied")
    out["first_over_hit"] = round(statistics.median(out["first_ttft_s"]) / statistics.median(out["hit_ttft_s"]), 1)
    out["full_blocks_of_the_prefix"] = 1000 // 16
    return out


def concurrency_part(opts) -> dict:
    """48 requests of ~300 tokens on the KV budget that 4 rows of 8192 tokens take: how many run at once."""
    from llama.engine import Engine, Request, SamplingParams
    from llama.model.kv_cache import pool_bytes_per_block

    shape = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=64, vocab_size=32000)
    args = ModelArgs(**shape)
    per_block = pool_bytes_per_block(args.n_layers, args.kv_heads, args.head_dim, torch.float32)
    budget_tokens = 4 * 8192
    model = model_at(shape, 64, 8192, torch.float32, None, blocks=1 + budget_tokens // 16)
    gen = Llama(model, Tokenizer(str(TOKENIZER)), prefix_cache=False)
    engine = Engine(gen.decode_step, gen.tokenizer, [])
    finished = []
    requests = [Request(p, SamplingParams(max_tokens=opts.tokens, temperature=0), finished.append, id=str(i))
                for i, p in enumerate(prompts(48, 300, 32000, seed=3))]
    waiting, most = list(requests), 0
    start = time.perf_counter()
    while waiting or engine.has_work:
        while waiting and engine.can_add(waiting[0]):
            engine.add(waiting.pop(0))
        most = max(most, engine.running)
        engine.step()
    ends = [e for e in finished if type(e).__name__ == "Finished"]
    return {"model": "dim 256, 2 layers, 4 KV heads, float32 (only the token count matters here)",
            "kv_budget_tokens": budget_tokens, "kv_budget_gib": round((1 + budget_tokens // 16) * per_block / 2 ** 30, 3),
            "row_design_concurrency": 4, "requests": 48, "prompt_tokens": 300, "max_tokens": opts.tokens,
            "most_running_at_once": most, "finished": len(ends),
            "failed": sum(e.reason not in ("stop", "length") for e in ends), "preemptions": engine.preemptions,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", required=True, choices=["concurrency", "decode", "long", "prefix"])
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--quantize", default=None, help="int8 or int4: the own kernels (the fused C step)")
    parser.add_argument("--plain", action="store_true", help="long: PyTorch's operators, not the fused C step")
    parser.add_argument("--contexts", default="1024,10240")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    add_run_options(parser)
    opts = parser.parse_args()
    apply_run_options(opts, PRESETS)
    part = {"concurrency": concurrency_part, "decode": decode_part, "long": long_part, "prefix": prefix_part}
    result = {"part": opts.part, "shape": opts.shape, "quantize": opts.quantize, "tree": str(Path(llama.__file__).parent.parent),
              **part[opts.part](opts)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
