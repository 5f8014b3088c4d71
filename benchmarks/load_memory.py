"""Peak memory per rank while loading a 2-shard checkpoint into 1 and 2 processes.

    python benchmarks/load_memory.py [--dim 1024 --n_layers 8 --n_heads 8] [--ckpt DIR] [--dtype bfloat16]
    python benchmarks/load_memory.py --ckpt DIR --quantize int4 --procs 0    # quantized at load

Writes a random checkpoint of the given shape in --shards shards (default 2) to a temporary folder (or uses
--ckpt), then builds it with `Llama.build`: once as a plain process (no torchrun), then under torchrun with
1 and with 2 processes. Each rank records its peak RSS (getrusage ru_maxrss) minus a baseline taken right
before the build, once after the build and once after a forward pass (which touches every weight: with as
many shards as processes and the checkpoint's dtype, build maps the weights without reading them), plus its
resident anonymous and file-backed memory. Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer.model"
VOCAB = 32000  # the tokenizer fixture's
DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4}


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def resident_kib() -> Dict[str, int]:
    """RssAnon / RssFile from /proc (Linux); empty elsewhere."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def worker(ckpt: str, out_dir: str, dtype: str, quantize=None) -> None:
    """One rank: build, measure, run a forward pass, measure again; write rank{R}.json."""
    import torch

    from llama import Llama

    torch.set_num_threads(1)
    baseline = peak_kib()
    start = time.perf_counter()
    generator = Llama.build(ckpt, str(TOKENIZER), max_seq_len=32, max_batch_size=1, device="cpu", dtype=dtype,
                            quantize=quantize)
    build_s = time.perf_counter() - start
    after_build, resident_build = peak_kib(), resident_kib()
    with torch.inference_mode():
        generator.model(torch.tensor([[1, 450, 7483, 310, 3444, 338]]), 0)
    after_forward, resident_forward = peak_kib(), resident_kib()
    rank = int(os.environ.get("RANK", 0))
    record = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", 1)),
        "build_s": round(build_s, 2),
        "baseline_peak_mib": mib(baseline),
        "peak_delta_after_build_mib": mib(after_build - baseline),
        "peak_delta_after_forward_mib": mib(after_forward - baseline),
        "resident_after_build_mib": {k: mib(v) for k, v in resident_build.items()},
        "resident_after_forward_mib": {k: mib(v) for k, v in resident_forward.items()},
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def make_checkpoint(folder: Path, opts) -> Path:
    from llama import ModelArgs
    from llama.checkpoints.checkpoint import random_state, split_state, write_checkpoint

    args = ModelArgs(dim=opts.dim, n_layers=opts.n_layers, n_heads=opts.n_heads, n_kv_heads=opts.n_kv_heads,
                     vocab_size=VOCAB, multiple_of=opts.multiple_of)
    state = random_state(args, seed=0)
    write_checkpoint(folder, args.to_params(vocab_size=-1), split_state(state, opts.shards))
    return folder


def launch(ckpt: Path, out_dir: Path, dtype: str, nproc: int, quantize=None) -> List[dict]:
    """nproc 0: a plain process; otherwise torchrun with nproc processes on this machine."""
    out_dir.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = [str(Path(__file__).resolve()), "--worker", str(ckpt), str(out_dir), "--dtype", dtype]
    if quantize:
        script += ["--quantize", quantize]
    if nproc == 0:
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
            env.pop(key, None)
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--n_kv_heads", type=int, default=None)
    parser.add_argument("--multiple_of", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--ckpt", help="use this checkpoint instead of writing a random one")
    parser.add_argument("--dtype", default="bfloat16", help="dtype the model is built in")
    parser.add_argument("--procs", default="0,1,2",
                        help="runs to make: 0 = plain process without torchrun, K = torchrun with K processes")
    parser.add_argument("--quantize", default=None, help="int8 or int4: quantize at load (Llama.build(quantize=))")
    parser.add_argument("--worker", nargs=2, metavar=("CKPT", "OUT_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--make-ckpt", metavar="DIR", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(*opts.worker, opts.dtype, opts.quantize)
        return
    if opts.make_ckpt:
        make_checkpoint(Path(opts.make_ckpt), opts)
        return
    # This process stays small (no torch): Linux carries a process's peak RSS over fork and exec, so a big
    # parent would raise every child's ru_maxrss baseline. The checkpoint is written by a child process too.

    with tempfile.TemporaryDirectory(prefix="load_memory_") as tmp:
        if opts.ckpt:
            ckpt = Path(opts.ckpt)
        else:
            print(f"writing a random {opts.shards}-shard checkpoint (dim {opts.dim}, {opts.n_layers} layers) ...",
                  file=sys.stderr, flush=True)
            ckpt = Path(tmp) / "ckpt"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-ckpt", str(ckpt),
                            *sys.argv[1:]], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        shards = sorted(ckpt.glob("consolidated.*.pth"))
        ckpt_bytes = sum(p.stat().st_size for p in shards)
        runs = []
        for nproc in (int(n) for n in opts.procs.split(",")):
            label = "plain process" if nproc == 0 else f"torchrun --nproc_per_node {nproc}"
            print(f"{label} ...", file=sys.stderr, flush=True)
            ranks = launch(ckpt, Path(tmp) / f"out{nproc}", opts.dtype, nproc, opts.quantize)
            # This rank's weights: the (bfloat16) checkpoint's bytes in the model's dtype, split over the processes.
            share_bytes = ckpt_bytes * DTYPE_BYTES.get(opts.dtype.lower(), 2) / 2 / max(nproc, 1)
            runs.append({"launch": label, "processes": max(nproc, 1), "model_share_mib": mib(share_bytes / 1024),
                         "max_rank_peak_after_build_mib": max(r["peak_delta_after_build_mib"] for r in ranks),
                         "max_rank_peak_after_forward_mib": max(r["peak_delta_after_forward_mib"] for r in ranks),
                         "ranks": ranks})
        print(json.dumps({
            "checkpoint": {"shards": len(shards), "mib": mib(ckpt_bytes / 1024),
                           "params": json.loads((ckpt / "params.json").read_text())},
            "model_dtype": opts.dtype,
            "quantize": opts.quantize,
            "runs": runs,
        }, indent=2))


if __name__ == "__main__":
    main()
