"""Build quantized models as one rank of a (torchrun) process group and record their outputs.

    torchrun --nproc_per_node M tests/quant_worker.py OUT_DIR CKPT[:MODE[:GROUP]] ...

Each spec is a checkpoint, quantized at load with MODE (int8, int4) and GROUP when given, else loaded as it is
(a quantized checkpoint loads quantized). Every rank builds each in turn (bfloat16, CPU), records the prefill
logits of a fixed prompt and the greedy tokens of a ragged batch, and writes OUT_DIR/rank{R}.json:
{"rank", "world", "results": {SPEC: {"logits", "tokens"}}}. The tests compare these with `outputs_for` run in the
test process itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import Llama  # noqa: E402

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "llama2-tokenizer.model"
PROMPTS = ["The capital of France is", "Hi", "Simply put, the theory of relativity states that"]
MAX_GEN_LEN = 6


def outputs_for(spec: str) -> Dict[str, object]:
    """Build `spec` (CKPT[:MODE[:GROUP]]) on CPU in this process's group: prefill logits and greedy tokens."""
    ckpt, mode, group = (spec.split(":") + [None, None])[:3]
    generator = Llama.build(ckpt, str(TOKENIZER), max_seq_len=64, max_batch_size=len(PROMPTS), device="cpu",
                            dtype="bfloat16", quantize=mode, group_size=int(group) if group else None)
    prompt_tokens: List[List[int]] = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    with torch.inference_mode():
        logits = generator.model.prefill(prompt_tokens[:1])[0]
    tokens, _ = generator.generate(prompt_tokens, max_gen_len=MAX_GEN_LEN, temperature=0.0)
    del generator
    return {"logits": logits.tolist(), "tokens": tokens}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("specs", nargs="+")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {spec: outputs_for(spec) for spec in opts.specs}
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world": world, "results": results}))
    os.replace(tmp, out / f"rank{rank}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
