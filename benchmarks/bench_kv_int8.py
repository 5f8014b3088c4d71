"""The KV cache in 8 bits (kv_dtype="int8", issue 31 item 5): memory per token, decode speed against bfloat16 KV,
and the demo model's held-out loss and log-prob deltas. Prints one JSON object per part.

    python benchmarks/bench_kv_int8.py --part memory
    python benchmarks/bench_kv_int8.py --part decode --quantize int8 --contexts 1024,8192 --batches 1,16
    python benchmarks/bench_kv_int8.py --part loss      # demo/fortune-llama, heldout.txt

decode: random weights at the chosen shape; one model holds a bfloat16 pool and an int8 pool and the timed
steps alternate between them (A B A B ...), each a decode step of every row at a context of N cached positions
(their values do not change the cost). loss: the demo's heldout.txt documents (as tests/test_demo.py scores them),
each run through the KV cache (prefill, then every next token decoded one by one through the decode step, so
that each prediction reads the keys and values the pool stored), with bfloat16 KV and with int8 KV.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama  # noqa: E402,F401  (before torch: the OpenMP wait policy)
import torch  # noqa: E402

from llama.model import PRESETS, ModelArgs  # noqa: E402
from llama.model.decode_step import DecodeStep  # noqa: E402
from llama.model.kv_cache import layer_block_bytes, pool_bytes_per_block  # noqa: E402
from llama.model.kv_int8 import KVPoolInt8  # noqa: E402

from bench_paged import model_at  # noqa: E402
from common import add_run_options, apply_run_options, timed  # noqa: E402

SHAPES = {"1.1B": PRESETS["1.1B"], "Llama-3.1-8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8)}


def memory_part(opts) -> dict:
    """KV bytes per token (every layer's keys and values) in bfloat16 and int8, from the sizes and from pools."""
    out = {}
    for name, shape in SHAPES.items():
        args = ModelArgs(**{**shape, "vocab_size": 32000})
        row = {}
        for kv in (None, "int8"):
            per_block = pool_bytes_per_block(args.n_layers, args.kv_heads, args.head_dim, torch.bfloat16, kv_dtype=kv)
            pool = (KVPoolInt8 if kv else _plain_pool)(2, 16, args.kv_heads, args.head_dim, torch.bfloat16)
            assert args.n_layers * layer_block_bytes(pool) == per_block  # what a pool allocates
            row[kv or "bfloat16"] = per_block // 16
        row["int8_over_bf16"] = round(row["int8"] / row["bfloat16"], 4)
        row["tokens_per_gib"] = {k: 2 ** 30 // row[k] for k in ("bfloat16", "int8")}
        out[name] = row
    return {"bytes_per_token": out}


def _plain_pool(*args):
    from llama.model.kv_cache import KVPool

    return KVPool(*args)


def decode_part(opts) -> dict:
    """Decode tokens/s with bfloat16 and int8 KV at each context and batch, alternating, medians."""
    shape = PRESETS[opts.shape]
    contexts = [int(x) for x in opts.contexts.split(",")]
    batches = [int(x) for x in opts.batches.split(",")]
    model = model_at(shape, max(batches), max(contexts) + 16, torch.bfloat16, opts.quantize, setup=False)
    pools = {}
    for kv in ("int8", "bfloat16"):  # each kind's pools, swapped into the layers in turn
        model.setup_cache("cpu", torch.bfloat16, kv_dtype=None if kv == "bfloat16" else kv)
        pools[kv] = [layer.attention.cache for layer in model.layers]
    step = DecodeStep(model, compiled=False, fused=False if opts.plain else None)
    path = "fused C" if step.fused is not None else "PyTorch"
    rates = {(kv, n, b): [] for kv in pools for n in contexts for b in batches}
    with torch.inference_mode():
        for rep in range(opts.repeat + 1):  # the first round warms up and is not counted
            for n in contexts:
                for b in batches:
                    for kv in (("bfloat16", "int8") if rep % 2 else ("int8", "bfloat16")):
                        for layer, pool in zip(model.layers, pools[kv]):
                            layer.attention.cache = pool
                        tokens = torch.full((b,), 5)
                        step(tokens, [n] * b)
                        seconds = timed(lambda: [step(tokens, [n] * b) for _ in range(opts.steps)])
                        if rep:
                            rates[(kv, n, b)].append(b * opts.steps / seconds)
    out = {"path": path, "steps_per_run": opts.steps, "runs": opts.repeat}
    for n in contexts:
        for b in batches:
            bf, i8 = (statistics.median(rates[(kv, n, b)]) for kv in ("bfloat16", "int8"))
            out[f"ctx{n}_batch{b}"] = {"bf16_kv_tok_s": round(bf, 2), "int8_kv_tok_s": round(i8, 2),
                                       "int8_over_bf16": round(i8 / bf, 3)}
    return out


def loss_part(opts) -> dict:
    """The demo's heldout.txt loss through the KV cache with bfloat16 and int8 KV, and the log-prob deltas."""
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "tests"))
    from test_demo import DEMO, _fortunes
    from llama import Llama

    docs = _fortunes(DEMO / "heldout.txt")[:opts.docs or None]
    out, logps = {}, {}
    for kv in ("auto", "int8"):
        gen = Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256, max_batch_size=1,
                          device="cpu", kv_dtype=kv)
        model = gen.model
        model.setup_cache("cpu", model.norm.weight.dtype, kv_dtype=kv)  # one row of its own (no engine here)
        step = DecodeStep(model, compiled=False)
        total, count, lps, plain, forward_lps = 0.0, 0, [], 0.0, []
        with torch.inference_mode():
            for doc in docs:
                ids = gen.tokenizer.encode(doc, bos=True, eos=True)[:256]
                logits = model.forward(torch.tensor([ids[:-1]]))[0]  # over the cached row (the PyTorch path)
                plain += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
                forward_lps.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))[:, 0])
                rows = [model.prefill([ids[:1]])[0]]
                for pos in range(1, len(ids) - 1):
                    rows.append(step(torch.tensor([ids[pos]]), [pos])[0])
                lp = torch.log_softmax(torch.stack(rows).float(), -1).gather(
                    -1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
                lps.append(lp)
                total -= lp.sum().item()
                count += len(ids) - 1
        name = "bf16_kv" if kv == "auto" else "int8_kv"
        out[f"{name}_decoded_loss"] = round(total / count, 4)
        out[f"{name}_forward_loss"] = round(plain / count, 4)
        out[f"{name}_path"] = "fused C" if step.fused is not None else "PyTorch"
        logps[kv] = torch.cat(lps)
        logps[kv + "-forward"] = torch.cat(forward_lps)
    delta = (logps["int8"] - logps["auto"]).abs()
    paths = (logps["auto-forward"] - logps["auto"]).abs()  # bf16 KV, fused C step against PyTorch's operators
    out.update({"bf16_kv_paths_delta_max": round(paths.max().item(), 4),
                "bf16_kv_paths_delta_mean": round(paths.mean().item(), 5)})
    out.update({"documents": len(docs), "tokens": int(delta.numel()), "logprob_delta_max": round(delta.max().item(), 4),
                "logprob_delta_mean": round(delta.mean().item(), 5),
                "loss_change": round(out["int8_kv_decoded_loss"] - out["bf16_kv_decoded_loss"], 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", required=True, choices=["memory", "decode", "loss"])
    parser.add_argument("--shape", default="1.1B", choices=sorted(PRESETS))
    parser.add_argument("--quantize", default=None, help="int8 or int4: the own kernels (the fused C step)")
    parser.add_argument("--plain", action="store_true", help="decode: PyTorch's operators, not the fused C step")
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--docs", type=int, default=0, help="loss: the first N documents (0: all)")
    add_run_options(parser)
    opts = parser.parse_args()
    apply_run_options(opts, PRESETS)
    part = {"memory": memory_part, "decode": decode_part, "loss": loss_part}[opts.part]
    about = {"shape": opts.shape, "quantize": opts.quantize} if opts.part == "decode" else {}
    print(json.dumps({"part": opts.part, **about, **part(opts)}))


if __name__ == "__main__":
    main()
