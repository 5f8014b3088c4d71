"""Many LoRA adapters per batch vs one merged adapter (issue 36): decode tokens/s of 16 streams.

Random weights at the chosen shape (bfloat16, the CPU's own kernels, as Llama.build prepares them) and random
rank-16 factors on every projection (q, k, v, o, gate, up, down). Arms, alternated `--repeat` times:
- merged: 16 streams on one merged adapter. A merged adapter only changes the weights' values, so this is the
  base model's decode step (the fused C step where the model allows it).
- four: 16 streams over 4 adapters kept beside the base (4 streams each): where the model allows the fused C
  step, it adds each row's adapter term itself (llama/cpu/csrc/lora.c, grouped by adapter); elsewhere the
  layers' path adds it per layer, masked by adapter (llama/model/lora_bank.py).
- layers: the base on the layers' path with no adapter (what the adapter term itself costs, apart from leaving
  the fused step).
Each arm times `--tokens` decode steps of all 16 rows through the decode step the engine calls (DecodeStep), after
a packed prefill of 16 prompts; the figure is the median over repeats.

    python benchmarks/bench_lora.py                     # 1.1B shape
    python benchmarks/bench_lora.py --layers 4          # quicker: 1.1B's layer shape, 4 layers
    python benchmarks/bench_lora.py --quantize int8     # an int8 base: merged runs the fused C step
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

from bench_paged import model_at, prompts  # noqa: E402
from llama.model import PRESETS  # noqa: E402
from llama.model import lora_bank  # noqa: E402
from llama.model.decode_step import DecodeStep  # noqa: E402

STREAMS, ADAPTERS, RANK = 16, 4, 16


def random_factors(bank: lora_bank.LoraBank, seed: int):
    """For each part of a bank, random A (r, in) and B (out, r), small enough to keep the activations sane."""
    g = torch.Generator().manual_seed(seed)
    in_features = bank.in_features
    return {key: (torch.randn(RANK, in_features, generator=g) * in_features ** -0.5,
                  torch.randn(cols, RANK, generator=g) * 0.01) for key, _, cols in bank.parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count (quicker runs)")
    parser.add_argument("--quantize", default=None, help="int8 or int4 base: the own kernels and the fused C step")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    shape = {**PRESETS[opts.shape], **({"n_layers": opts.layers} if opts.layers else {})}
    model = model_at(shape, STREAMS, opts.prompt + opts.tokens + 8, torch.bfloat16, opts.quantize)
    lora = lora_bank.attach(model, ADAPTERS, RANK)
    for slot in range(ADAPTERS):
        lora.load(slot, f"adapter{slot}", lambda keys, slot=slot: {
            k: v for bank in lora.banks for k, v in random_factors(bank, 100 * slot + lora.banks.index(bank)).items()
            if k in keys})
    fused = DecodeStep(model, compiled=False)
    layers = DecodeStep(model, compiled=False, fused=False)
    with torch.inference_mode():
        model.prefill(prompts(STREAMS, opts.prompt, shape["vocab_size"]))
    tokens = torch.randint(3, 1000, (STREAMS,))

    def run(arm: str) -> float:
        step = layers if arm == "layers" else fused
        if arm == "four":
            lora.select([i % ADAPTERS for i in range(STREAMS)], 1, tokens.device)
        else:
            lora.clear()
        with torch.inference_mode():
            step(tokens, [opts.prompt] * STREAMS)  # warm
            start = time.perf_counter()
            for k in range(opts.tokens):
                step(tokens, [opts.prompt + k] * STREAMS)
            seconds = time.perf_counter() - start
        lora.clear()
        return STREAMS * opts.tokens / seconds

    rates = {"merged": [], "four": [], "layers": []}
    for _ in range(opts.repeat):
        for arm in rates:
            rates[arm].append(run(arm))
    med = {arm: statistics.median(r) for arm, r in rates.items()}
    print(json.dumps({
        "shape": opts.shape, "n_layers": shape["n_layers"], "dtype": "bfloat16", "quantize": opts.quantize,
        "streams": STREAMS,
        "adapters": ADAPTERS, "rank": RANK, "targets": "q,k,v,o,gate,up,down",
        "merged_path": "fused C" if fused.fused is not None else "layers",
        **{f"{arm}_tok_s": round(m, 2) for arm, m in med.items()},
        **{f"{arm}_runs": [round(x, 2) for x in r] for arm, r in rates.items()},
        "four_over_merged": round(med["four"] / med["merged"], 3),
        "four_over_layers": round(med["four"] / med["layers"], 3),
        "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
