"""Decode speed against the memory-bandwidth limit, with transformers side by side.

Random weights at a real layer shape are generated directly on the device (no checkpoint files). Prints JSON:
prefill tokens/s, decode tokens/s at batch 1, 4 and 8, the bytes of weights read per decode step, the memory
bandwidth this device reaches on a plain streaming read (measured here), the achieved fraction of it at batch
1, and (with --hf) transformers' LlamaForCausalLM batch-1 decode on the same weights and dtype.

    python benchmarks/bench_decode.py --shape 1.1B --hf                 # this CPU
    python benchmarks/bench_decode.py --shape 7B --device cuda          # a GPU
    python benchmarks/bench_decode.py --shape 70B --n_layers 4 --device cuda   # 70B layer shapes, a few layers
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama import Llama, ModelArgs, Tokenizer, Transformer  # noqa: E402
from llama import cpu, distributed  # noqa: E402
from llama.generation import resolve_dtype  # noqa: E402
from llama.model import PRESETS, count_parameters  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer.model"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of a streaming read (a sum over 1 GiB of float32), best of several."""
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    seconds = best_of(lambda: x.sum(), device, repeat=10)
    return x.numel() * 4 / seconds


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    model.setup_cache(device, dtype)
    return model.eval()


def prompts(bsz: int, length: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for _ in range(bsz)]


def decode_rate(run, bsz: int, n: int, device, repeat: int) -> float:
    """Tokens/s of decoding alone: generating n + 1 tokens minus generating 1 (the prefill and first sample)."""
    t1 = best_of(lambda: run(bsz, 1), device, repeat)
    tn = best_of(lambda: run(bsz, n + 1), device, repeat)
    return bsz * n / (tn - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--n_layers", type=int, help="override the layer count (70B layer shapes, a few layers)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hf", action="store_true", help="also time transformers' LlamaForCausalLM at batch 1")
    parser.add_argument("--pairs", type=int, default=5, help="alternating ours/transformers decode timings")
    parser.add_argument("--plain", action="store_true", help="without the fast kernels (Llama.build(fast=False))")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    runtime = distributed.setup(None, opts.device)
    device, dtype = runtime.device, resolve_dtype(opts.dtype, runtime.device)
    shape = dict(PRESETS[opts.shape])
    if opts.n_layers:
        shape["n_layers"] = opts.n_layers
    args = ModelArgs(**shape, max_batch_size=8, max_seq_len=opts.prompt_len + opts.decode_tokens + 8)
    model = random_model(args, device, dtype)
    hf = None
    if opts.hf:  # the same weights in the Hugging Face layout, converted before ours are packed
        sys.path.insert(0, str(ROOT / "tests"))
        from test_parity import meta_to_hf  # the tests' independent conversion to the Hugging Face layout

        hf = meta_to_hf({k: v.float().cpu() for k, v in model.state_dict().items()}, args).to(device, dtype)
    path = cpu.linear_path(device, dtype)
    if not opts.plain and path.packs:
        model.pack_for_cpu(path)  # what Llama.build does by default (fast=True)
    gen = Llama(model, Tokenizer(TOKENIZER), device=device)
    gen.tokenizer.eos_id = -1  # random weights: never stop early, so every run decodes the same count

    # Every weight is read once per decode step, except the embedding table (one row of it).
    read_per_step = (count_parameters(args) - args.vocab_size * args.dim) * dtype.itemsize
    bandwidth = read_bandwidth(device)
    result = {"shape": opts.shape, "n_layers": args.n_layers, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "fast": not opts.plain,
              "weight_bytes_read_per_step": read_per_step,
              "measured_read_bandwidth_gb_s": round(bandwidth / 1e9, 1)}

    def ours(bsz, n):
        gen.generate(prompts(bsz, 16, args.vocab_size), max_gen_len=n, temperature=0)

    seconds = best_of(lambda: gen.generate(prompts(1, opts.prompt_len, args.vocab_size), max_gen_len=1,
                                           temperature=0), device, opts.repeat)
    result["prefill_tok_s"] = round(opts.prompt_len / seconds, 1)
    for bsz in (1, 4, 8):
        result[f"decode_tok_s_batch{bsz}"] = round(decode_rate(ours, bsz, opts.decode_tokens, device, opts.repeat), 2)
    result["batch1_bandwidth_fraction"] = round(result["decode_tok_s_batch1"] * read_per_step / bandwidth, 3)

    if hf is not None:

        def theirs(bsz, n):
            ids = torch.tensor(prompts(bsz, 16, args.vocab_size), device=device)
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        ids = torch.tensor(prompts(1, opts.prompt_len, args.vocab_size), device=device)
        with torch.no_grad():
            seconds = best_of(lambda: hf(ids), device, opts.repeat)
        result["hf_prefill_tok_s"] = round(opts.prompt_len / seconds, 1)
        # Shared machines drift: time the two side by side, in alternation, and quote the median of the
        # pairwise ratios as well as each side's median.
        pairs = [(decode_rate(ours, 1, opts.decode_tokens, device, 1),
                  decode_rate(theirs, 1, opts.decode_tokens, device, 1)) for _ in range(opts.pairs)]
        result["paired_decode_tok_s_batch1"] = round(statistics.median(a for a, _ in pairs), 2)
        result["hf_decode_tok_s_batch1"] = round(statistics.median(b for _, b in pairs), 2)
        result["decode_batch1_vs_hf"] = round(statistics.median(a / b for a, b in pairs), 2)
        result["decode_batch1_vs_hf_each_pair"] = [round(a / b, 2) for a, b in pairs]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
