"""The loading route: which modules (rooms) of llama/ `Llama.build(ckpt_dir=...)` passes through, in order.

Builds a tiny random checkpoint (Meta's layout, or Hugging Face's with --hf), then traces Llama.build with
sys.settrace, keeping the module of every function called within llama/ up to --depth calls below build
itself. Consecutive calls in one module are one stay; a return is a stay in a module already left. The route
is what issue 34 measures ("at most 7 rooms with no return to a room already left").

    PYTHONPATH=$PWD python scripts/loading_route.py [--hf] [--quantize int8] [--lora] [--depth 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _carries(value, folder: str) -> bool:
    """Whether a call argument is the checkpoint's data on its way: the folder or a file in it, an object naming
    the folder (a BuildConfig, what is on disk), what the reader made of it (an object holding shards), a state
    dict of the weights, or the model they went into."""
    import torch

    if isinstance(value, (str, Path)):
        return str(value).startswith(folder)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Path):
        return str(value[0]).startswith(folder)
    if isinstance(value, dict):
        return "tok_embeddings.weight" in value and isinstance(value["tok_embeddings.weight"], torch.Tensor)
    if isinstance(value, torch.nn.Module):
        return hasattr(value, "tok_embeddings")
    if isinstance(value, type):
        return False
    where = [getattr(value, name, None) for name in ("ckpt_dir", "folder")]  # a BuildConfig, what is on disk
    if any(isinstance(w, (str, Path)) and str(w).startswith(folder) for w in where):
        return True
    return any(hasattr(value, name) for name in ("shards", "checkpoint"))


def trace_build(ckpt: Path, tokenizer: Path, depth: int, calls: bool = False, **options) -> List[str]:
    """The modules (without the 'llama.' prefix) of the calls within llama/ that the checkpoint's data passes
    through while Llama.build runs, until the loaded model reaches Llama.__init__: calls taking it (see
    `_carries`), at most `depth` frames below build."""
    from llama import Llama

    package, folder = str(ROOT / "llama"), str(ckpt)
    route: List[str] = []
    handed = []  # set once the loaded model reaches Llama.__init__: the route ends there

    def tracer(frame, event, arg):
        if handed or event != "call" or not frame.f_code.co_filename.startswith(package):
            return None
        if frame.f_code.co_name == "__init__" and type(frame.f_locals.get("self")).__name__ == "Llama":
            handed.append(True)
            name = frame.f_globals["__name__"].removeprefix("llama.")
            if route[-1:] != [name]:
                route.append(name)
            return None
        level, f = 0, frame
        while f is not None and f.f_code.co_name != "build":
            f, level = f.f_back, level + 1
        if f is None or level > depth:
            return None
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if level and not any(_carries(frame.f_locals.get(n), folder) for n in names):
            return None
        name = frame.f_globals.get("__name__", "?").removeprefix("llama.")
        if calls:
            print(f"{'  ' * level}{name}.{code.co_qualname}")
        if not route or route[-1] != name:
            route.append(name)
        return None

    sys.settrace(tracer)
    try:
        Llama.build(str(ckpt), str(tokenizer), max_seq_len=64, max_batch_size=1, device="cpu", **options)
    finally:
        sys.settrace(None)
    return route


PLAN = ("generation", "checkpoints.loading")  # the rooms that compose the load (Llama.build and its Plan)


def summary(route: List[str]) -> str:
    """Rooms, stays and returns (stays in a room already left); also the returns to rooms other than the plan's:
    the rooms the plan asks more than once."""
    rooms, left, returns = [], set(), []
    for i, room in enumerate(route):
        if room in left:
            returns.append(room)
        if i:
            left.add(route[i - 1])
        if room not in rooms:
            rooms.append(room)
    asked = sorted({r for r in returns if r not in PLAN})
    return (f"{len(rooms)} rooms in {len(route)} stays, {len(returns)} returns; rooms other than the plan's "
            f"{list(PLAN)} asked more than once: {asked or 'none'}\n  " + " -> ".join(route))


def write_adapter(folder: Path, args, r: int = 2) -> Path:
    """A random PEFT LoRA adapter of rank `r` on every layer's q_proj and v_proj (adapter_config.json and
    adapter_model.safetensors, as PEFT saves them)."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}))
    out = {"q_proj": args.n_heads * args.head_dim, "v_proj": args.kv_heads * args.head_dim}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(args.n_layers):
        for module, rows in out.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, args.dim, generator=gen) * 0.01
            tensors[f"{name}.lora_B.weight"] = torch.randn(rows, r, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", action="store_true", help="a Hugging Face layout checkpoint")
    parser.add_argument("--calls", action="store_true", help="print each call on the route, indented by depth")
    parser.add_argument("--depth", type=int, default=99, help="frames below Llama.build to follow (1: its own calls)")
    parser.add_argument("--quantize", choices=("int8", "int4"), help="quantize the weights at load")
    parser.add_argument("--lora", action="store_true", help="merge a small random LoRA adapter at load")
    options = parser.parse_args()
    from helpers import MHA, TOKENIZER, make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "meta", MHA)
        if options.hf:
            from llama.checkpoints.convert import meta_to_hf

            meta_to_hf(ckpt, Path(tmp) / "hf", tokenizer_path=TOKENIZER)
            ckpt = Path(tmp) / "hf"
        extra = {"quantize": options.quantize} if options.quantize else {}
        if options.lora:
            extra["lora"] = str(write_adapter(Path(tmp) / "adapter", MHA))
        trace_build(ckpt, TOKENIZER, options.depth, **extra)  # first build: imports, caches
        print(summary(trace_build(ckpt, TOKENIZER, options.depth, options.calls, **extra)))


if __name__ == "__main__":
    main()
