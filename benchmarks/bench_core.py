"""Core benchmark: loading, prefill (single and ragged batch) and decode speed, against transformers.

Builds a random checkpoint of a given shape in Meta's layout (bfloat16) in a temporary folder, then measures,
each in a fresh process so peak memory is this step's alone:
  - Llama.build: seconds and peak RSS over the interpreter's baseline, against the checkpoint's bytes;
  - prefill of one 256-token prompt, and of a ragged batch of 4 (256/224/192/160 tokens);
  - decode tokens/s at batch 1 and batch 4;
  - transformers' LlamaForCausalLM batch-1 decode on the same weights and dtype (if transformers is installed).
Prints one JSON object. Example (the 1.1B shape is the default):
    python benchmarks/bench_core.py --dim 2048 --n_layers 22 --n_heads 32 --n_kv_heads 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RAGGED = [256, 224, 192, 160]


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
    from llama.checkpoint import random_state, split_state, write_checkpoint

    args = ModelArgs(**json.loads(args_json))
    write_checkpoint(folder, args.to_params(vocab_size=-1), split_state(random_state(args, seed=0), 1))


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def prompts(lengths, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def ours(folder: Path, tokenizer: str, threads: int, decode_tokens: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from llama import Llama

    baseline = current_rss_mb()
    start = time.perf_counter()
    gen = Llama.build(str(folder), tokenizer, max_seq_len=512, max_batch_size=4, device="cpu", dtype="bfloat16")
    load_s = time.perf_counter() - start
    peak = rss_mb() - baseline
    gen.tokenizer.eos_id = -1  # random weights: never stop early, so every run decodes the same count
    vocab = gen.model.params.vocab_size
    single, ragged = prompts([256], vocab), prompts(RAGGED, vocab)
    out = {"load_s": round(load_s, 2), "build_peak_rss_mb": round(peak, 1)}
    gen.generate(single, max_gen_len=1, temperature=0)  # every weight is read (paged in) at least once
    out["peak_rss_after_first_forward_mb"] = round(rss_mb() - baseline, 1)
    out["prefill_1x256_s"] = timed(lambda: gen.generate(single, max_gen_len=1, temperature=0))
    out["prefill_ragged_4_s"] = timed(lambda: gen.generate(ragged, max_gen_len=1, temperature=0))
    out["ragged_over_single"] = round(out["prefill_ragged_4_s"] / out["prefill_1x256_s"], 2)
    for bsz in (1, 4):
        short = prompts([16] * bsz, vocab)
        t1 = timed(lambda: gen.generate(short, max_gen_len=1, temperature=0), repeat=2)
        tn = timed(lambda: gen.generate(short, max_gen_len=decode_tokens + 1, temperature=0), repeat=2)
        out[f"decode_tok_s_batch{bsz}"] = round(bsz * decode_tokens / (tn - t1), 2)
    return out


def hf(folder: Path, threads: int, decode_tokens: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers

    from llama import ModelArgs
    from llama.checkpoint import read_params

    sys.path.insert(0, str(ROOT / "tests"))
    from test_parity import meta_to_hf  # the tests' independent conversion to the Hugging Face layout

    params = read_params(folder)
    state = torch.load(folder / "consolidated.00.pth", weights_only=True, mmap=True)
    args = ModelArgs(**{**params, "vocab_size": state["tok_embeddings.weight"].shape[0]})
    model = meta_to_hf(state, args).to(torch.bfloat16)
    ids = torch.tensor(prompts([16], args.vocab_size))

    def run(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    t1, tn = timed(lambda: run(1), repeat=2), timed(lambda: run(decode_tokens + 1), repeat=2)
    return {"transformers_version": transformers.__version__,
            "hf_decode_tok_s_batch1": round(decode_tokens / (tn - t1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n_layers", type=int, default=22)
    parser.add_argument("--n_heads", type=int, default=32)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    tokenizer = str(ROOT / "tests" / "fixtures" / "llama2-tokenizer.model")

    if opts.step == "ours":
        print(json.dumps(ours(Path(opts.folder), tokenizer, opts.threads, opts.decode_tokens)))
        return
    if opts.step == "hf":
        print(json.dumps(hf(Path(opts.folder), opts.threads, opts.decode_tokens)))
        return

    shape = {"dim": opts.dim, "n_layers": opts.n_layers, "n_heads": opts.n_heads, "n_kv_heads": opts.n_kv_heads,
             "vocab_size": 32000, "multiple_of": 256}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        make(folder, json.dumps(shape))
        ckpt_mb = (folder / "consolidated.00.pth").stat().st_size / 2**20
        result = {"shape": shape, "dtype": "bfloat16", "threads": opts.threads, "checkpoint_mb": round(ckpt_mb, 1)}

        def step(name):
            cmd = [sys.executable, __file__, "--step", name, "--folder", str(folder),
                   "--threads", str(opts.threads), "--decode_tokens", str(opts.decode_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        result.update(step("ours"))
        result["build_peak_rss_over_checkpoint"] = round(result["build_peak_rss_mb"] / ckpt_mb, 3)
        result["first_forward_peak_rss_over_checkpoint"] = round(result["peak_rss_after_first_forward_mb"] / ckpt_mb, 3)
        if not opts.skip_hf:
            result.update(step("hf"))
            result["decode_batch1_vs_transformers"] = round(
                result["decode_tok_s_batch1"] / result["hf_decode_tok_s_batch1"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
