"""Decode and prefill speed against the memory-bandwidth limit, with transformers and float32 side by side.

Random weights at a real layer shape are generated directly on the device (no checkpoint files). Prints JSON:
which linear kernel path ran (counted from the model: packed modules, kernel family, the CPU flags that chose
it), prefill tokens/s, decode tokens/s at batch 1, 4 and 8, the bytes of weights read per decode step, the
memory bandwidth this device reaches on a plain streaming read, and the achieved fraction of it at batch 1.
With --hf, transformers' LlamaForCausalLM on the same weights and dtype (--hf_static: its generate with a
static cache, which compiles the forward); with --vs_float32, this library in float32 on the same weights:
each timed in alternation with ours (a b a b ...), medians and the median of the pairwise ratios. With
--vs_eager (where the decode step is compiled, as on CUDA by default), the same model with an eager decode
step, in alternation too. Progress goes to stderr.

With --quantize int8,int4 it compares instead: the model as Llama.build makes it (--dtype), each quantized
form of the same weights and (--float32) a float32 model, batch-1 decode timed in alternation, round after
round; medians, the median of each round's ratio to the unquantized model and to float32, and each model's
bytes of weights.

    python benchmarks/bench_decode.py --shape 1.1B --hf                 # this CPU, the dtype dtype=None picks
    python benchmarks/bench_decode.py --dtype bfloat16 --vs_float32     # is bf16 prefill as fast as float32?
    python benchmarks/bench_decode.py --shape 7B --device cuda --hf_static --vs_eager   # a GPU
    python benchmarks/bench_decode.py --shape 1.1B --quantize int8,int4 --float32    # weight-only quantization
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_decode.py --hf                          # an AVX2-only CPU, emulated
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama  # noqa: E402,F401  (before torch: the OpenMP wait policy, an emulated CPU's compile cache)
import torch  # noqa: E402

from llama import Llama, ModelArgs, Tokenizer, Transformer  # noqa: E402
from llama import cpu, distributed, quant, quantize  # noqa: E402
from llama.model.decode_step import default_compile  # noqa: E402
from llama.checkpoints.loading import resolve_dtype  # noqa: E402
from llama.model import PRESETS, count_parameters  # noqa: E402
from common import kernel_report, paired, timed  # noqa: E402

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


def progress(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


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


def same_weights(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of an unpacked model in another dtype."""
    with torch.device("meta"):
        copy = Transformer(model.params)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
    copy.setup_cache(model.rope.device, dtype)
    return copy.eval()


def prompts(bsz: int, length: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for _ in range(bsz)]


def decode_rate(run, bsz: int, n: int, device, repeat: int) -> float:
    """Tokens/s of decoding alone: generating n + 1 tokens minus generating 1 (the prefill and first sample)."""
    t1 = best_of(lambda: run(bsz, 1), device, repeat)
    tn = best_of(lambda: run(bsz, n + 1), device, repeat)
    return bsz * n / (tn - t1)


def generator(model: Transformer, compiled: bool = False) -> Llama:
    gen = Llama(model, Tokenizer(TOKENIZER), compile=compiled)
    gen.engine.stop_ids = frozenset()  # random weights: never stop early, so every run decodes the same count
    return gen


def ours_runner(gen: Llama, vocab: int):
    def run(bsz, n, length=16):
        gen.generate(prompts(bsz, length, vocab), max_gen_len=n, temperature=0)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--n_layers", type=int, help="override the layer count (70B layer shapes, a few layers)")
    parser.add_argument("--dim", type=int, help="override the model dim (tests: a tiny model of the same form)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default: what Llama.build's dtype=None picks here")
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batches", default="1,4,8", help="decode batch sizes timed on their own")
    parser.add_argument("--hf", action="store_true", help="also time transformers' LlamaForCausalLM")
    parser.add_argument("--hf_static", action="store_true",
                        help="also time transformers' generate with a static cache (which compiles its forward)")
    parser.add_argument("--vs_float32", action="store_true", help="also time this library in float32")
    parser.add_argument("--pairs", type=int, default=5, help="alternating timings against --hf / --vs_float32")
    parser.add_argument("--plain", action="store_true", help="without the fast kernels (Llama.build(fast=False))")
    parser.add_argument("--path", choices=sorted(cpu.KERNELS), default=None,
                        help="force a linear kernel path instead of the one llama.cpu chooses for this CPU")
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                        help="the decode step compiled or eager (auto: as Llama.build, compiled on CUDA only)")
    parser.add_argument("--vs_eager", action="store_true", help="also time an eager decode step, in alternation")
    parser.add_argument("--quantize", default=None, metavar="MODES",
                        help="compare batch-1 decode with these quantized forms (int8, int4, int4:G for group G)")
    parser.add_argument("--float32", action="store_true", help="with --quantize, also a float32 model")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    runtime = distributed.setup(1, distributed.pick_device(opts.device))
    device, dtype = runtime.device, resolve_dtype(opts.dtype, runtime.device, quantized=bool(opts.quantize))
    shape = dict(PRESETS[opts.shape])
    if opts.n_layers:
        shape["n_layers"] = opts.n_layers
    if opts.dim:
        shape["dim"] = opts.dim
    args = ModelArgs(**shape, max_batch_size=8, max_seq_len=opts.prompt_len + opts.decode_tokens + 8)
    compiled = default_compile(device, {"auto": None, "yes": True, "no": False}[opts.compile])
    if opts.quantize:
        compare_quantized(opts, args, device, dtype, compiled)
        return
    progress(f"building random {opts.shape} weights ({args.n_layers} layers, dim {args.dim}, {dtype}) on {device}")
    model = random_model(args, device, dtype)
    hf = None
    if opts.hf or opts.hf_static:  # the same weights in the Hugging Face layout, converted before ours are packed
        from hf_reference import meta_to_hf  # independent of llama/checkpoints/hf.py; shared with tests/test_parity.py

        hf = meta_to_hf({k: v.float().cpu() for k, v in model.state_dict().items()}, args).to(device, dtype)
    f32 = same_weights(model, torch.float32) if opts.vs_float32 and dtype != torch.float32 else None
    if not opts.plain:  # what Llama.build does by default (fast=True)
        model.prepare(cpu.kernel_for(device, dtype, opts.path))
    gen = generator(model, compiled)
    ours = ours_runner(gen, args.vocab_size)
    if compiled:
        progress("compiling the decode step (timed: the compile warm-up)")
        result_warmup = timed(lambda: ours(1, opts.decode_tokens + 1))

    # Every weight is read once per decode step, except the embedding table (one row of it).
    read_per_step = (count_parameters(args) - args.vocab_size * args.dim) * dtype.itemsize
    bandwidth = read_bandwidth(device)
    result = {"shape": opts.shape, "n_layers": args.n_layers, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "decode_step": "compiled" if compiled else "eager",
              **({"compile_warmup_s": round(result_warmup, 1)} if compiled else {}),
              **(kernel_report(model) if device.type == "cpu" else {}),
              "weight_bytes_read_per_step": read_per_step,
              "measured_read_bandwidth_gb_s": round(bandwidth / 1e9, 1)}
    progress(result.get("describe", result["device"]))

    def prefill_rate(run):
        return lambda: opts.prompt_len / timed(lambda: run(1, 1, opts.prompt_len))

    progress(f"prefill of {opts.prompt_len} tokens")
    seconds = best_of(lambda: ours(1, 1, opts.prompt_len), device, opts.repeat)
    result["prefill_tok_s"] = round(opts.prompt_len / seconds, 1)
    for bsz in map(int, opts.batches.split(",")):
        progress(f"decode at batch {bsz}")
        result[f"decode_tok_s_batch{bsz}"] = round(decode_rate(ours, bsz, opts.decode_tokens, device, opts.repeat), 2)
    if "decode_tok_s_batch1" in result:
        result["batch1_bandwidth_fraction"] = round(result["decode_tok_s_batch1"] * read_per_step / bandwidth, 3)

    def decode1(run):
        return lambda: decode_rate(run, 1, opts.decode_tokens, device, 1)

    def hf_runner(**generate_args):
        def run(bsz, n, length=16):
            ids = torch.tensor(prompts(bsz, length, args.vocab_size), device=device)
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **generate_args)
        return run

    if opts.hf_static:
        static = hf_runner(cache_implementation="static")
        progress("transformers with a static cache: warming up (it compiles its forward)")
        result["hf_static_warmup_s"] = round(timed(lambda: static(1, opts.decode_tokens + 1)), 1)
        progress(f"ours and transformers' static-cache generate in alternation, {opts.pairs} pairs")
        dec = paired(decode1(ours), decode1(static), opts.pairs)
        result.update({"hf_static_decode_tok_s_batch1": dec["b"], "decode_batch1_vs_hf_static": dec["ratio"],
                       "decode_batch1_vs_hf_static_each_pair": dec["each_pair"]})
    def against(run, what: str):
        """Decode and prefill timed in alternation with another runner, after its warm-up."""
        run(1, 2)
        progress(f"{what} in alternation, {opts.pairs} pairs")
        return (paired(decode1(ours), decode1(run), opts.pairs),
                paired(prefill_rate(ours), prefill_rate(run), opts.pairs))

    if opts.hf:
        dec, pre = against(hf_runner(), "ours and transformers")
        result.update({"paired_decode_tok_s_batch1": dec["a"], "hf_decode_tok_s_batch1": dec["b"],
                       "decode_batch1_vs_hf": dec["ratio"], "decode_batch1_vs_hf_each_pair": dec["each_pair"],
                       "paired_prefill_tok_s": pre["a"], "hf_prefill_tok_s": pre["b"], "prefill_vs_hf": pre["ratio"],
                       "prefill_vs_hf_each_pair": pre["each_pair"]})
    if opts.vs_eager and compiled:
        dec, pre = against(ours_runner(generator(model, False), args.vocab_size), "compiled and eager decode steps")
        result.update({"eager_decode_tok_s_batch1": dec["b"], "decode_batch1_vs_eager": dec["ratio"],
                       "decode_batch1_vs_eager_each_pair": dec["each_pair"], "prefill_vs_eager": pre["ratio"]})
    if f32 is not None:
        dec, pre = against(ours_runner(generator(f32, compiled), args.vocab_size), f"ours in {dtype} and in float32")
        result.update({"paired_prefill_tok_s_vs_float32": pre["a"], "float32_prefill_tok_s": pre["b"],
                       "prefill_vs_float32": pre["ratio"], "prefill_vs_float32_each_pair": pre["each_pair"],
                       "float32_decode_tok_s_batch1": dec["b"], "decode_batch1_vs_float32": dec["ratio"]})
    print(json.dumps(result, indent=2))


def model_bytes(model: Transformer) -> int:
    """Bytes of the model's weights as it runs (parameters and buffers, the KV cache and rotary tables aside)."""
    tensors = {id(t): t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not name.endswith((".k", ".v")) and name != "rope"}
    held = sum(m.packed.out_features * m.packed.in_features * 2 for m in model.modules()  # fbgemm holds its own
               if isinstance(m, cpu.Fp16Linear))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + held


def compare_quantized(opts, args: ModelArgs, device: torch.device, dtype: torch.dtype, compiled: bool) -> None:
    """Batch-1 decode of the unquantized model, its quantized forms and optionally float32, in alternation."""
    variants = {}

    def add(name: str, model: Transformer) -> None:
        variants[name] = (generator(model, compiled), model_bytes(model))

    base = random_model(args, device, dtype)
    base.prepare(cpu.kernel_for(device, dtype))  # what Llama.build does by default
    add(str(dtype).removeprefix("torch."), base)
    for spec in opts.quantize.split(","):
        mode, _, group = spec.partition(":")
        scheme = quant.parse(mode, int(group) if group else None)
        model = random_model(args, device, dtype)  # the same seed: the same weights
        quantize.quantize_model(model, scheme)
        model.prepare(quantize.kernel_for_quantize(scheme, device, dtype))
        add(scheme.label, model)
    if opts.float32:
        model = random_model(args, device, torch.float32)
        model.prepare(cpu.kernel_for(device, torch.float32))
        add("float32", model)

    def rate(gen):
        return decode_rate(lambda bsz, n: gen.generate(prompts(bsz, 16, args.vocab_size), max_gen_len=n,
                                                       temperature=0), 1, opts.decode_tokens, device, 1)

    names = list(variants)
    for name in names:  # warm-up
        rate(variants[name][0])
    rounds = []
    for r in range(opts.pairs):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no variant always runs first
        rounds.append({name: rate(variants[name][0]) for name in order})
    base_name = names[0]
    result = {"shape": opts.shape, "n_layers": args.n_layers, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "rounds": opts.pairs, "decode_tokens": opts.decode_tokens,
              "decode_step": "compiled" if compiled else "eager",
              "variants": {}}
    if device.type == "cuda":
        result["peak_cuda_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    for name in names:
        entry = {"decode_tok_s_batch1": round(statistics.median(r[name] for r in rounds), 2),
                 f"vs_{base_name}": round(statistics.median(r[name] / r[base_name] for r in rounds), 2),
                 f"vs_{base_name}_each_round": [round(r[name] / r[base_name], 2) for r in rounds],
                 "weight_gib": round(variants[name][1] / 2**30, 3),
                 f"weight_bytes_vs_{base_name}": round(variants[name][1] / variants[base_name][1], 3)}
        if "float32" in variants:
            entry["vs_float32"] = round(statistics.median(r[name] / r["float32"] for r in rounds), 2)
        result["variants"][name] = entry
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
