"""Weight-only kernels at one layer's matrix-vector products, side by side: what llama.checkpoints.quantize chose and why.

One Transformer block of a real shape (its four products as the model runs them: fused wq/wk/wv, wo, fused
w1/w3, w2) times one token, through each candidate: float32 and bfloat16 F.linear, bfloat16 with oneDNN-packed
weights (llama.cpu's onednn-bf16 path, where the CPU has native bf16), this library's Int8Linear and Int4Linear
(its own kernels where they run, and `_aten`: PyTorch's built-in weight-only operators) and, when it is
installed, torchao's quantize_ with its int8 and int4 weight-only configs. The candidates run in alternation, round after round; before each timed call a
buffer larger than the last-level cache is written, so the weights come from memory as they do in a full
model. Prints JSON: median microseconds per block, GB/s of weight bytes, and the median of each round's
ratio to bfloat16 F.linear and to the packed path.

    python benchmarks/bench_quant_kernels.py --shape 1.1B --threads 1
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

import llama  # noqa: E402,F401  (before torch: the OpenMP wait policy, an emulated CPU's compile cache)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from llama import cpu  # noqa: E402
from llama.model import PRESETS, ModelArgs  # noqa: E402
from llama.quant import GROUP_SIZES, Int4Grouped, Int8PerRow  # noqa: E402


def block_weights(args: ModelArgs, seed: int = 0) -> List[torch.Tensor]:
    """The four float32 weights (out, in) of one block, fused as the model runs them."""
    g = torch.Generator().manual_seed(seed)
    d, kv, ffn = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes = [(d + 2 * kv, d), (d, d), (2 * ffn, d), (d, ffn)]
    return [torch.randn(shape, generator=g) / shape[1] ** 0.5 for shape in shapes]


def torchao_linear(weight: torch.Tensor, config) -> nn.Module:
    import torchao.quantization as tq

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16)
    layer.weight.data.copy_(weight)
    tq.quantize_(layer, config)
    return layer


def candidates(weights: List[torch.Tensor], with_torchao: bool) -> Dict[str, List[Callable]]:
    bf16 = [w.to(torch.bfloat16) for w in weights]
    out: Dict[str, List[Callable]] = {
        "float32": [lambda x, w=w: F.linear(x, w) for w in weights],
        "bfloat16": [lambda x, w=w: F.linear(x, w) for w in bf16],
    }
    if cpu.info().onednn_bf16:
        out["bfloat16_packed"] = [cpu.OneDnnLinear(w) for w in bf16]
    if cpu.info().fbgemm:
        out["bfloat16_fbgemm_fp16"] = [cpu.Fp16Linear(w) for w in bf16]
    for scheme in [Int8PerRow()] + [Int4Grouped(g) for g in GROUP_SIZES]:  # each: the own kernels, then aten's
        out[scheme.label] = [scheme.kernel(scheme.quantize(w), torch.bfloat16) for w in bf16]
        out[f"{scheme.label}_aten"] = [scheme.kernel(scheme.quantize(w), torch.bfloat16, isa=None) for w in bf16]
    if with_torchao:
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        out["torchao_int8"] = [torchao_linear(w, Int8WeightOnlyConfig(set_inductor_config=False)) for w in bf16]
        out["torchao_int4_g64"] = [torchao_linear(w, PrototypeInt4WeightOnlyConfig(
            group_size=64, set_inductor_config=False)) for w in bf16]
    return out


def weight_bytes(name: str, weights: List[torch.Tensor]) -> float:
    n = sum(w.numel() for w in weights)
    if name.startswith("float32"):
        return 4 * n
    if "int8" in name:
        return n
    if "int4" in name:
        g = int(name.split("_g", 1)[1].split("_")[0])
        return n / 2 + n / g * 4  # codes, plus a bfloat16 scale and zero per group
    return 2 * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1, help="tokens per product (1: decoding)")
    parser.add_argument("--evict_mb", type=int, default=1024, help="buffer written before each timed call")
    parser.add_argument("--no_torchao", action="store_true")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with_torchao = not opts.no_torchao
    if with_torchao:
        try:
            import torchao  # noqa: F401
        except ImportError:
            with_torchao = False

    args = ModelArgs(**PRESETS[opts.shape])
    weights = block_weights(args)
    kernels = candidates(weights, with_torchao)
    inputs = {w.shape[1]: torch.randn(opts.batch, w.shape[1]) for w in weights}
    evict = torch.empty(opts.evict_mb * 2**18, dtype=torch.float32)

    def run(name: str) -> float:
        dtype = torch.float32 if name == "float32" else torch.bfloat16
        xs = [inputs[w.shape[1]].to(dtype) for w in weights]
        evict.fill_(1.0)
        start = time.perf_counter()
        with torch.inference_mode():
            for kernel, x in zip(kernels[name], xs):
                kernel(x)
        return time.perf_counter() - start

    for name in kernels:  # warm up (first calls allocate and, for some, repack)
        run(name)
    rounds: List[Dict[str, float]] = []
    names = list(kernels)
    for r in range(opts.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate, so no candidate always runs first
        rounds.append({name: run(name) for name in order})

    result = {"shape": opts.shape, "batch": opts.batch, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "candidates": {}}
    if with_torchao:
        import torchao

        result["torchao"] = torchao.__version__
    for name in names:
        seconds = statistics.median(r[name] for r in rounds)
        entry = {"us_per_block": round(seconds * 1e6, 1),
                 "weight_gb_s": round(weight_bytes(name, weights) / seconds / 1e9, 1),
                 "speedup_vs_bfloat16": round(statistics.median(r["bfloat16"] / r[name] for r in rounds), 2)}
        if "bfloat16_packed" in kernels:
            entry["speedup_vs_packed"] = round(statistics.median(r["bfloat16_packed"] / r[name] for r in rounds), 2)
        entry["speedup_vs_float32"] = round(statistics.median(r["float32"] / r[name] for r in rounds), 2)
        result["candidates"][name] = entry
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
