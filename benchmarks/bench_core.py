"""Core benchmark: loading, prefill (single and ragged batch) and decode speed, against transformers.

Writes a random checkpoint of a given shape in Meta's layout (bfloat16) to a temporary folder, removed on any
exit (Ctrl-C and SIGTERM included), then measures each step in a fresh process, so that peak memory is that
step's alone:
  - ours: Llama.build seconds and peak RSS over the interpreter's baseline, against the checkpoint's bytes;
    the linear kernel path that ran (counted from the model), the CPU flags that chose it; prefill of one
    256-token prompt and of a ragged batch of 4 (256/224/192/160 tokens); decode tokens/s at batch 1 and 4;
  - paired (unless --skip_hf): this library and transformers' LlamaForCausalLM on the same weights and dtype,
    batch-1 decode timed in alternation (ours, theirs, ours, ...): medians and the median pairwise ratio.
Progress goes to stderr, one JSON object to stdout. The defaults (the 1.1B shape) take about 3 minutes on 2
cores. Example:
    python benchmarks/bench_core.py --dim 2048 --n_layers 22 --n_heads 32 --n_kv_heads 4
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import llama` does, before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RAGGED = [256, 224, 192, 160]
START = float(os.environ.setdefault("BENCH_CORE_START", str(time.time())))  # the steps inherit the parent's


def progress(message: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def rss_mb() -> float:
    """Peak RSS of this process image. (getrusage's ru_maxrss would include the parent's peak from before exec.)"""
    return _status_mb("VmHWM")


def make(folder: Path, args_json: str) -> None:
    from llama import ModelArgs
    from llama.checkpoints.checkpoint import random_state, split_state, write_checkpoint

    args = ModelArgs(**json.loads(args_json))
    write_checkpoint(folder, args.to_params(vocab_size=-1), split_state(random_state(args, seed=0), 1))


def best(fn, repeat: int) -> float:
    """Best of `repeat` timed runs after one warm-up run."""
    fn()
    seconds = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds


def prompts(lengths, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def build(folder: Path, tokenizer: str, dtype):
    from llama import Llama

    gen = Llama.build(str(folder), tokenizer, max_seq_len=512, max_batch_size=4, device="cpu", dtype=dtype)
    gen.tokenizer.eos_id = -1  # random weights: never stop early, so every run decodes the same count
    return gen


def decode_rate(gen, bsz: int, n: int, repeat: int) -> float:
    """Tokens/s of decoding alone: generating n + 1 tokens minus generating 1 (the prefill and first sample)."""
    short = prompts([16] * bsz, gen.model.params.vocab_size)
    t1 = best(lambda: gen.generate(short, max_gen_len=1, temperature=0), repeat)
    tn = best(lambda: gen.generate(short, max_gen_len=n + 1, temperature=0), repeat)
    return bsz * n / (tn - t1)


def ours(folder: Path, tokenizer: str, opts) -> dict:
    import torch

    torch.set_num_threads(opts.threads)
    from common import kernel_report

    baseline = current_rss_mb()
    start = time.perf_counter()
    gen = build(folder, tokenizer, opts.dtype)
    load_s = time.perf_counter() - start
    peak = rss_mb() - baseline
    progress(f"ours: built in {load_s:.1f} s")
    vocab = gen.model.params.vocab_size
    single, ragged = prompts([256], vocab), prompts(RAGGED, vocab)
    out = {"dtype": str(gen.model.norm.weight.dtype).removeprefix("torch."), **kernel_report(gen.model),
           "load_s": round(load_s, 2), "build_peak_rss_mb": round(peak, 1)}
    gen.generate(single, max_gen_len=1, temperature=0)  # every weight is read (paged in) at least once
    out["peak_rss_after_first_forward_mb"] = round(rss_mb() - baseline, 1)
    progress("ours: prefill of one 256-token prompt")
    out["prefill_1x256_s"] = round(best(lambda: gen.generate(single, max_gen_len=1, temperature=0), opts.repeat), 3)
    progress(f"ours: prefill of a ragged batch of {len(RAGGED)} ({'/'.join(map(str, RAGGED))} tokens)")
    out["prefill_ragged_4_s"] = round(best(lambda: gen.generate(ragged, max_gen_len=1, temperature=0),
                                           opts.repeat), 3)
    out["ragged_over_single"] = round(out["prefill_ragged_4_s"] / out["prefill_1x256_s"], 2)
    for bsz in (1, 4):
        progress(f"ours: decode at batch {bsz}")
        out[f"decode_tok_s_batch{bsz}"] = round(decode_rate(gen, bsz, opts.decode_tokens, opts.repeat), 2)
    return out


def paired(folder: Path, tokenizer: str, opts) -> dict:
    """This library and transformers, the same weights and dtype, batch-1 decode timed in alternation."""
    import statistics

    import torch

    torch.set_num_threads(opts.threads)
    import transformers

    from hf_reference import meta_to_hf  # independent of llama/checkpoints/hf.py; shared with tests/test_parity.py

    from llama import ModelArgs

    gen = build(folder, tokenizer, opts.dtype)
    dtype = gen.model.norm.weight.dtype
    state = torch.load(folder / "consolidated.00.pth", weights_only=True, mmap=True)
    args = ModelArgs(**{**json.loads((folder / "params.json").read_text()),
                        "vocab_size": state["tok_embeddings.weight"].shape[0]})
    progress(f"paired: converting the weights for transformers ({dtype})")
    hf = meta_to_hf(state, args).to(dtype)
    del state
    ids = torch.tensor(prompts([16], args.vocab_size))

    def theirs(n: int) -> None:
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def their_rate() -> float:
        return opts.decode_tokens / (best(lambda: theirs(opts.decode_tokens + 1), 1) - best(lambda: theirs(1), 1))

    pairs = []
    for i in range(opts.pairs):
        pairs.append((decode_rate(gen, 1, opts.decode_tokens, 1), their_rate()))
        progress(f"paired: {i + 1}/{opts.pairs}: ours {pairs[-1][0]:.2f} tok/s, transformers {pairs[-1][1]:.2f}")
    return {"transformers_version": transformers.__version__,
            "paired_decode_tok_s_batch1": round(statistics.median(a for a, _ in pairs), 2),
            "hf_decode_tok_s_batch1": round(statistics.median(b for _, b in pairs), 2),
            "decode_batch1_vs_transformers": round(statistics.median(a / b for a, b in pairs), 2),
            "decode_batch1_vs_transformers_each_pair": [round(a / b, 2) for a, b in pairs]}


def run_step(name: str, folder: Path, opts) -> dict:
    """Run one measurement in a fresh process (its stderr passes through); stop it if we are stopped."""
    cmd = [sys.executable, __file__, "--step", name, "--folder", str(folder), "--threads", str(opts.threads),
           "--decode_tokens", str(opts.decode_tokens), "--repeat", str(opts.repeat), "--pairs", str(opts.pairs)]
    if opts.dtype:
        cmd += ["--dtype", opts.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if proc.returncode:
        raise SystemExit(f"step {name!r} failed (exit status {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the TemporaryDirectory, which removes the checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n_layers", type=int, default=22)
    parser.add_argument("--n_heads", type=int, default=32)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="default: what Llama.build's dtype=None picks on this CPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs after a warm-up (the best is kept)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating ours/transformers decode timings")
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    tokenizer = str(ROOT / "tests" / "fixtures" / "llama2-tokenizer.model")

    if opts.step:
        step = {"ours": ours, "paired": paired}[opts.step]
        print(json.dumps(step(Path(opts.folder), tokenizer, opts)))
        return

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    shape = {"dim": opts.dim, "n_layers": opts.n_layers, "n_heads": opts.n_heads, "n_kv_heads": opts.n_kv_heads,
             "vocab_size": 32000, "multiple_of": 256}
    with tempfile.TemporaryDirectory(prefix="bench_core-") as tmp:
        folder = Path(tmp) / "ckpt"
        progress(f"writing a random checkpoint {shape} to {folder} (removed at exit)")
        make(folder, json.dumps(shape))
        ckpt_mb = (folder / "consolidated.00.pth").stat().st_size / 2**20
        result = {"shape": shape, "threads": opts.threads, "checkpoint_mb": round(ckpt_mb, 1),
                  "date": time.strftime("%Y-%m-%d")}
        progress(f"checkpoint written ({ckpt_mb:.0f} MiB); step 'ours' in a fresh process")
        result.update(run_step("ours", folder, opts))
        result["build_peak_rss_over_checkpoint"] = round(result["build_peak_rss_mb"] / ckpt_mb, 3)
        result["first_forward_peak_rss_over_checkpoint"] = round(result["peak_rss_after_first_forward_mb"] / ckpt_mb, 3)
        if not opts.skip_hf:
            progress("step 'paired' (ours and transformers in alternation) in a fresh process")
            result.update(run_step("paired", folder, opts))
    result["total_s"] = round(time.time() - START, 1)
    progress("done")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
