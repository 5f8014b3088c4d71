"""llama.cpp's llama-bench against this library's end-to-end `Llama.generate`, alternating, on the same weights.

DIR holds the library's checkpoints random-1.1b{,-int8,-int4}/ and tokenizer.model, and llama.cpp's files of the
same weights random-1.1b-{bf16,q8_0,q4_0}.gguf (README, "Against llama.cpp", makes them). Each round runs
llama-bench (pp256 and tg128, 3 repetitions) over the three files, then the library on each precision in a
fresh process: prefill = 256 / the time of a 256-token prompt's first token; decode = 128 / (the time of 129
tokens after a 16-token prompt - the time of its first), best of 3 and 2, the prefix cache off. Prints each
round's figures and the medians with the ratios (library / llama.cpp), as JSON.

--isa avx2 runs the library emulated as an AVX2-only CPU (PyTorch, oneDNN, MKL and fbgemm capped at AVX2; the
library's own kernels follow ATEN_CPU_CAPABILITY); point --llama_bench at a llama.cpp built for AVX2 alone.

    python benchmarks/vs_llamacpp_generate.py DIR --llama_bench ../llama.cpp/build/bin/llama-bench [--isa avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("bf16", "random-1.1b", "random-1.1b-bf16.gguf"), ("int8", "random-1.1b-int8", "random-1.1b-q8_0.gguf"),
         ("int4", "random-1.1b-int4", "random-1.1b-q4_0.gguf")]
EMULATE = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, "native": {}}
LIBRARY = """
import json, sys, time
from llama import Llama, cpu  # before torch, as the library's programs do: OpenMP's threads then wait passively
import torch
g = Llama.build(ckpt_dir=sys.argv[1], tokenizer_path=sys.argv[2], max_seq_len=512, max_batch_size=1,
                prefix_cache=False)
g.tokenizer.eos_id = -1
gen = torch.Generator().manual_seed(1)
prompt = lambda n: [[1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist()]
long, short = prompt(256), prompt(16)
def best(fn, rounds):
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return min(times)
pre = best(lambda: g.generate(long, max_gen_len=1, temperature=0), 3)
one = best(lambda: g.generate(short, max_gen_len=1, temperature=0), 2)
many = best(lambda: g.generate(short, max_gen_len=129, temperature=0), 2)
print(json.dumps(dict(prefill=256 / pre, decode=128 / (many - one), cpu=cpu.describe(g.model))))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--llama_bench", type=Path, required=True, help="llama.cpp's llama-bench binary")
    parser.add_argument("--isa", choices=sorted(EMULATE), default="native")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="bf16,int8,int4",
                        help="comma-separated subset of bf16,int8,int4 (split a long campaign into short calls)")
    opts = parser.parse_args()
    chosen = opts.precisions.split(",")
    bad = [p for p in chosen if p not in {k for k, _, _ in PAIRS}]
    if bad or not chosen:
        raise SystemExit(f"error: --precisions takes bf16, int8, int4, not {opts.precisions!r}")
    pairs = [p for p in PAIRS if p[0] in chosen]
    missing = [p for p in [opts.llama_bench] + [opts.dir / n for pair in pairs for n in pair[1:]] if not p.exists()]
    if missing:
        raise SystemExit(f"error: not found: {', '.join(map(str, missing))}")
    env = {**os.environ, **EMULATE[opts.isa], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(opts.threads)}
    res = {k: {"lib_dec": [], "lib_pre": [], "cpp_dec": [], "cpp_pre": []} for k, _, _ in pairs}
    for r in range(opts.rounds):
        files = sum((["-m", str(opts.dir / g)] for _, _, g in pairs), [])
        out = subprocess.run([str(opts.llama_bench), *files, "-p", "256", "-n", "128", "-t", str(opts.threads),
                              "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
        for row in json.loads(out.stdout):
            for k, _, g in pairs:
                if row["model_filename"].endswith(g):
                    res[k]["cpp_pre" if row["n_prompt"] else "cpp_dec"].append(row["avg_ts"])
        for k, d, _ in pairs:
            o = subprocess.run([sys.executable, "-c", LIBRARY, str(opts.dir / d), str(opts.dir / "tokenizer.model")],
                               capture_output=True, text=True, env=env)
            if o.returncode:
                raise SystemExit(f"{k}: {o.stderr[-2000:]}")
            j = json.loads(o.stdout.strip().splitlines()[-1])
            res[k]["lib_dec"].append(j["decode"])
            res[k]["lib_pre"].append(j["prefill"])
            if r == 0:
                print(json.dumps({"precision": k, "cpu": j["cpu"]}), flush=True)
        print(json.dumps({"round": r, **{k: {m: round(v[-1], 1) for m, v in d.items()} for k, d in res.items()}}),
              flush=True)
    med = {k: {m: round(statistics.median(v), 1) for m, v in d.items()} for k, d in res.items()}
    for d in med.values():
        d["decode_ratio"] = round(d["lib_dec"] / d["cpp_dec"], 2)
        d["prefill_ratio"] = round(d["lib_pre"] / d["cpp_pre"], 2)
    print(json.dumps({"isa": opts.isa, "median": med}))


if __name__ == "__main__":
    main()
