"""Build checkpoints (either layout, with or without a LoRA adapter) as one rank of a (torchrun) process group.

    torchrun --nproc_per_node M tests/hf_worker.py OUT_DIR CKPT[:[+]ADAPTER] [CKPT[:[+]ADAPTER] ...]

(`:ADAPTER` merges the adapter at load; `:+ADAPTER` keeps it beside the base as "x", chosen for every row.)

Every rank builds each checkpoint in turn (float32, CPU), records the full logits of LOGIT_PROMPT and a greedy
generation with log-probabilities (mp_worker.PROMPTS, echo), and writes OUT_DIR/rank{R}.pt:
{"rank", "world", "results": {SPEC: {"logits", "tokens", "logprobs"}}}. The tests compare these with
transformers, PEFT and the one-process runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama import Llama  # noqa: E402
from mp_worker import MAX_GEN_LEN, PROMPTS, TOKENIZER  # noqa: E402

LOGIT_PROMPT = "Low-rank adapters change a few directions of each weight matrix."


def run_for(ckpt_dir: str, lora: Optional[str] = None, dtype: str = "float32") -> Dict[str, object]:
    """Build `ckpt_dir` (+ `lora`) in this process's group; logits of LOGIT_PROMPT and greedy PROMPTS."""
    beside = lora is not None and lora.startswith("+")
    generator = Llama.build(ckpt_dir, str(TOKENIZER), max_seq_len=64, max_batch_size=len(PROMPTS),
                            device="cpu", dtype=dtype, lora={"x": lora[1:]} if beside else lora)
    ids = generator.tokenizer.encode(LOGIT_PROMPT, bos=True, eos=False)
    with torch.inference_mode():
        if beside:  # the adapter's factors in slot 0, chosen for the one row
            generator.model.lora_slots.load(0, "x", lora[1:])
            generator.model.lora_set.select([0], len(ids), torch.device("cpu"))
        logits = generator.model(torch.tensor([ids]), 0)[0].clone()
        if beside:
            generator.model.lora_set.clear()
    prompt_tokens: List[List[int]] = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = generator.generate(prompt_tokens, max_gen_len=MAX_GEN_LEN, temperature=0.0, logprobs=True,
                                          echo=True, lora="x" if beside else None)
    del generator
    return {"logits": logits, "tokens": tokens, "logprobs": logprobs}


def launch(out_dir: Path, specs: List[str], nproc: int) -> Dict[str, Dict[str, object]]:
    """Run this worker under torchrun with `nproc` processes; rank 0's results, after checking that every rank
    finished cleanly with the same results (model parallelism gathers the logits on every rank)."""
    from helpers import run_torchrun

    proc = run_torchrun(Path(__file__), [str(out_dir), *specs], nproc=nproc, timeout=300)
    assert proc.returncode == 0, \
        f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    assert [r["world"] for r in ranks] == [nproc] * nproc
    for other in ranks[1:]:
        for spec in specs:
            mine, first = other["results"][spec], ranks[0]["results"][spec]
            assert torch.equal(mine["logits"], first["logits"]), f"rank {other['rank']} disagrees on {spec}"
            assert mine["tokens"] == first["tokens"] and mine["logprobs"] == first["logprobs"], spec
    return ranks[0]["results"]


def main(argv: List[str]) -> int:
    out, specs = Path(argv[0]), argv[1:]
    torch.set_num_threads(1)
    results = {}
    for spec in specs:
        ckpt, _, lora = spec.partition(":")
        results[spec] = run_for(ckpt, lora or None)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.pt.tmp"
    torch.save({"rank": rank, "world": world, "results": results}, tmp)
    os.replace(tmp, out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
