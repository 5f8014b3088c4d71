"""Run greedy generation on one or more checkpoints, as one rank of a (torchrun) process group.

    torchrun --nproc_per_node M tests/mp_worker.py OUT_DIR CKPT [CKPT ...] [--register MODULE:CLASS --family NAME]

Every rank builds each checkpoint in turn (the process group is set up once and reused), generates from a
fixed ragged batch of prompts (temperature 0, log-probs, echo; then sampled) and writes OUT_DIR/rank{R}.json:
{"rank", "world", "results": {CKPT: {"tokens", "logprobs", "sampled"}}}. The tests compare these files
with the single-process run of the merged weights (`generate_for` below, run in the test process itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import Llama  # noqa: E402

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "llama2-tokenizer.model"
# Ragged on purpose: rows of different prompt lengths decode at different positions in one batch.
PROMPTS = [
    "The capital of France is",
    "Hi",
    "Simply put, the theory of relativity states that",
]
MAX_GEN_LEN = 6


def generate_for(ckpt_dir: str, dtype: str = "float32", device: str = "cpu", tokenizer: str = str(TOKENIZER),
                 family: Optional[str] = None) -> Dict[str, object]:
    """Build `ckpt_dir` on CPU in this process's group and greedily continue PROMPTS."""
    generator = Llama.build(ckpt_dir, tokenizer, max_seq_len=64, max_batch_size=len(PROMPTS),
                            device=device, dtype=dtype, family=family)
    prompt_tokens: List[List[int]] = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = generator.generate(prompt_tokens, max_gen_len=MAX_GEN_LEN, temperature=0.0,
                                          logprobs=True, echo=True)
    # Sampled too: every rank draws with the same seeded generator from the same gathered logits, so the
    # ranks' outputs (compared whole by the tests) must agree here as well.
    sampled, _ = generator.generate(prompt_tokens, max_gen_len=MAX_GEN_LEN, temperature=1.0, top_p=0.9)
    del generator
    return {"tokens": tokens, "logprobs": logprobs, "sampled": sampled}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("ckpt_dirs", nargs="+")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--register", help="MODULE:CLASS, a Family subclass to register first (a plugin family)")
    parser.add_argument("--family")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    if opts.register:
        import importlib

        from llama import families

        module, name = opts.register.split(":")
        families.register(getattr(importlib.import_module(module), name)(), detect_first=False)
    results = {ckpt: generate_for(ckpt, opts.dtype, opts.device, opts.tokenizer, opts.family)
               for ckpt in opts.ckpt_dirs}
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world": world, "results": results}))
    os.replace(tmp, out / f"rank{rank}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
