"""Decode and prefill on a CPU for each precision, against the memory bandwidth measured in the same run.

Random weights at a real shape (default 1.1B: dim 2048, 22 layers), built as `Llama.build` builds them: bfloat16
on this CPU's fastest path (llama.cpu), int8 and int4 (groups of 64) through the kernels llama.checkpoints.quantize picks
here (--aten adds oneDNN's bfloat16 product and PyTorch's own weight-only operators on the same weights, for
comparison). Each round times every variant once, in a rotating order, each one's decoding between two plain
streaming reads of 1 GiB (the faster of PyTorch's `x.sum()` and the C kernels' threads reading it with their
widest loads, llama.qkernels.read); the figures are medians over the rounds, and each share uses the mean of
the two reads around it (the bandwidth of a shared host drifts within a round):

- decode_tok_s: batch-1 greedy decoding, --decode_tokens steps of the engine's decode step after a 16-token
  prompt (on the own kernels: their layers in one C call, llama/model/fused_decode.py; --layers adds the same
  models stepping layer by layer in PyTorch, as <precision>_layers);
- prefill_tok_s: one forward pass over a prompt of --prompt_len tokens (logits at its last position only);
- bandwidth_share: decode_tok_s x the bytes of weights read per token (every weight once, except the embedding
  table, of which one row) / the read bandwidth.

Prints JSON; progress on stderr.

    python benchmarks/bench_cpu.py                     # 1.1B, this CPU's thread count
    python benchmarks/bench_cpu.py --threads 2 --aten  # with PyTorch's int8/int4 operators beside
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama  # noqa: E402,F401  (before torch: the OpenMP wait policy)
import torch  # noqa: E402

from llama import ModelArgs, Transformer, cpu, qkernels, quant, quantize  # noqa: E402
from llama.model.decode_step import DecodeStep  # noqa: E402
from llama.model import PRESETS  # noqa: E402
from bench_decode import prompts, random_model  # noqa: E402
from common import kernel_report  # noqa: E402

CPU = torch.device("cpu")


def progress(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def read_bandwidth(x: torch.Tensor) -> float:
    """Bytes/s of a plain streaming read of `x`: the faster of PyTorch's sum over it and the C kernels' pool
    reading it once with the widest loads (llama.qkernels.read), each timed once."""
    reads = [x.sum] + ([lambda: qkernels.read(x)] if qkernels.load() is not None else [])
    best = 0.0
    for read in reads:
        start = time.perf_counter()
        read()
        best = max(best, x.numel() * x.element_size() / (time.perf_counter() - start))
    return best


def bytes_read_per_token(model: Transformer) -> int:
    """The bytes of weights a batch-1 decode step reads: every parameter and buffer of the model as it runs, the
    embedding table (one row read), the KV cache and the rotary tables aside."""
    skip = ("tok_embeddings.weight", "rope")
    tensors = {id(t): t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if name not in skip and not name.endswith((".k", ".v"))}
    held = sum(m.packed.out_features * m.packed.in_features * 2 for m in model.modules()  # fbgemm holds its own
               if isinstance(m, cpu.Fp16Linear))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + held


def build(args: ModelArgs, precision: str) -> Transformer:
    """The random model (always the same weights) in one precision: bfloat16, int8, int4_g64 (+ _aten)."""
    model = random_model(args, CPU, torch.bfloat16)
    if precision.startswith("bfloat16"):  # as Llama.build picks it, or oneDNN's (bfloat16_onednn)
        path = "onednn-bf16" if precision.endswith("onednn") else None
        model.prepare(cpu.kernel_for(CPU, torch.bfloat16, path, max_batch=args.max_batch_size))
        return model
    mode, _, rest = precision.partition("_")
    scheme = quant.parse(mode)  # int4: the default groups of 64
    quantize.quantize_model(model, scheme)
    model.prepare(quantize.kernel_for_quantize(scheme, CPU, torch.bfloat16,
                                               isa=None if rest.endswith("aten") else "auto"))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--n_layers", type=int, help="override the layer count")
    parser.add_argument("--dim", type=int, help="override the model dim (tests: a tiny model of the same form)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--precisions", default="bfloat16,int8,int4_g64",
                        help="comma-separated: bfloat16, int8, int4_g64")
    parser.add_argument("--aten", action="store_true",
                        help="also bfloat16 through oneDNN and int8/int4 through PyTorch's operators")
    parser.add_argument("--layers", action="store_true",
                        help="also decode layer by layer in PyTorch (<precision>_layers) beside the fused C step")
    parser.add_argument("--read_gib", type=float, default=1.0, help="size of the streaming read")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    shape = dict(PRESETS[opts.shape])
    if opts.n_layers:
        shape["n_layers"] = opts.n_layers
    if opts.dim:
        shape["dim"] = opts.dim
    args = ModelArgs(**shape, max_batch_size=1, max_seq_len=opts.prompt_len + opts.decode_tokens + 8)
    peers = ["int8_aten", "int4_g64_aten"]
    if "bfloat16" in opts.precisions.split(",") and cpu.linear_path(CPU, torch.bfloat16, max_batch=1) == "own-bf16":
        peers.insert(0, "bfloat16_onednn")  # the path the own kernel replaces here
    names = opts.precisions.split(",") + (peers if opts.aten else [])
    bad = [n for n in names if n not in ("bfloat16", "int8", "int4_g64", "bfloat16_onednn", "int8_aten",
                                         "int4_g64_aten")]
    if opts.layers:
        names += [f"{n}_layers" for n in opts.precisions.split(",")]
    if bad:
        parser.error(f"unknown precision {bad[0]!r}: use bfloat16, int8, int4_g64")

    models: Dict[str, Transformer] = {}
    for name in names:
        progress(f"building {opts.shape} ({args.n_layers} layers) as {name}")
        models[name] = build(args, name.removesuffix("_layers"))
    per_token = {name: bytes_read_per_token(model) for name, model in models.items()}
    prompt = torch.tensor(prompts(1, opts.prompt_len, args.vocab_size))
    last = torch.tensor([[opts.prompt_len - 1]])
    steps = {name: DecodeStep(model, compiled=False, fused=not name.endswith("_layers"))  # as the engine steps
             for name, model in models.items()}

    def decode(name: str) -> float:
        """Tokens/s of greedy decode steps after a 16-token prompt (llama.decode_step.DecodeStep, as the engine
        calls it; the prompt's prefill is not timed)."""
        model, step_fn = models[name], steps[name]
        with torch.inference_mode():
            logits = model(prompt[:, :16], 0, logits_at=torch.tensor([[15]]))
            token = logits[:, -1].argmax(-1)
            start = time.perf_counter()
            for step in range(opts.decode_tokens):
                logits = step_fn(token, [16 + step])
                token = logits.argmax(-1)
            return opts.decode_tokens / (time.perf_counter() - start)

    def prefill(name: str) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            models[name](prompt, 0, logits_at=last)
            return opts.prompt_len / (time.perf_counter() - start)

    stream = torch.ones(int(opts.read_gib * 2**28), dtype=torch.float32)
    for name in names:  # warm-up
        decode(name)
        prefill(name)
    read_bandwidth(stream)
    rounds: List[Dict[str, object]] = []
    for r in range(opts.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no variant always runs first
        progress(f"round {r + 1}/{opts.rounds}: {', '.join(order)}")
        result: Dict[str, object] = {}
        for name in order:  # each decode between two reads: the bandwidth drifts within a round on a shared host
            before = read_bandwidth(stream)
            tok_s = decode(name)
            result[name] = (tok_s, prefill(name), (before + read_bandwidth(stream)) / 2)
        rounds.append(result)

    def median(fn: Callable[[dict], float]) -> float:
        return statistics.median(fn(r) for r in rounds)


    info = cpu.info()
    out = {"shape": opts.shape, "n_layers": args.n_layers, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": info.model,
           "cpu_flags": sorted(info.flags), "quantized_isa": cpu.quantized_isa(), "rounds": opts.rounds,
           "decode_tokens": opts.decode_tokens, "prompt_len": opts.prompt_len,
           "read_bandwidth_gb_s": round(statistics.median(r[n][2] for r in rounds for n in names) / 1e9, 1),
           "precisions": {}}
    for name in names:
        out["precisions"][name] = {
            "kernels": kernel_report(models[name])["linear_kernels"],
            "decode_step": "fused C layers" if steps[name].fused is not None else "PyTorch layer by layer",
            "weight_bytes_read_per_token": per_token[name],
            "decode_tok_s": round(median(lambda r: r[name][0]), 2),
            "prefill_tok_s": round(median(lambda r: r[name][1]), 1),
            "read_bandwidth_gb_s": round(median(lambda r: r[name][2]) / 1e9, 1),
            "bandwidth_share": round(median(lambda r: r[name][0] * per_token[name] / r[name][2]), 3),
            "bandwidth_share_each_round": [round(r[name][0] * per_token[name] / r[name][2], 3) for r in rounds],
        }
    if "bfloat16" in models:  # each round's ratio, then the median: the load drifts between rounds
        for name in names:
            out["precisions"][name]["decode_vs_bfloat16"] = round(median(lambda r: r[name][0] / r["bfloat16"][0]), 2)
            out["precisions"][name]["prefill_vs_bfloat16"] = round(median(lambda r: r[name][1] / r["bfloat16"][1]), 2)
    for name in names:
        own = name.rpartition("_")[0]
        if name.endswith(("_aten", "_onednn", "_layers")) and own in models:
            out["precisions"][name][f"decode_vs_{own}"] = round(median(lambda r: r[name][0] / r[own][0]), 2)
            out["precisions"][name][f"prefill_vs_{own}"] = round(median(lambda r: r[name][1] / r[own][1]), 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
