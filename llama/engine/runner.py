"""The model calls of one engine step, run the same way on every model-parallel rank.

A step first updates the block tables of the paged KV cache (llama/model/kv_cache.py: blocks newly given to rows,
rows emptied), then runs at most one decode (one token for every row 0..B-1; an idle row at position -1 writes
into the null block), then packed prefills of newly admitted prompts into their rows' blocks (a long prompt's
later chunks, or the rest of a prompt after its cached blocks, continue its row: `Prefill.start`), and last
copies of shared, partly filled blocks for the choices of an n > 1 request that fork after their prompt
(copy on write).

Two ways to keep ranks in step: in the library every rank runs its own engine on identical inputs (`Runner`);
in the server rank 0 plans and shares each plan (plain lists of ints) with the others, which only execute
(`Runner(channel=...)` and `follow`). Sampling happens where the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..model.decode_step import DecodeStep
from ..model.distributed import Broadcast


@dataclass
class Prefill:
    """One packed forward pass: prompt i fills row rows[i]'s blocks from position 0."""

    prompts: List[List[int]]
    rows: List[int]
    all_logits: bool = False  # logits at every prompt position (prompt log-probs), not only the last
    start: int = 0  # > 0: one chunk of a long prompt, continuing its row from this position (one prompt)
    adapters: Optional[List[int]] = None  # each prompt's LoRA bank slot (-1: the base); None: all the base


@dataclass
class StepPlan:
    decode_tokens: Optional[List[int]] = None  # one token per cache row 0..B-1; None: no decode this step
    decode_positions: Optional[List[int]] = None  # where each row's token goes
    # Speculative verification instead of the decode: S tokens per cache row 0..B-1 (the pending token, then the
    # drafts, padded by repeating the last), each at its own position; logits (B, S, V) come back.
    verify_tokens: Optional[List[List[int]]] = None
    verify_positions: Optional[List[List[int]]] = None
    prefills: List[Prefill] = field(default_factory=list)
    # Block tables (llama/model/kv_cache.py), before anything else: (row, first entry, blocks), the entries from
    # `first` on becoming `blocks` and then the null block.
    tables: List[Tuple[int, int, List[int]]] = field(default_factory=list)
    copies: List[Tuple[int, int]] = field(default_factory=list)  # (pool block, into pool block), after prefills
    # LoRA adapters (llama/model/lora_bank.py): (slot, name, folder) loaded first, and each decoded (or verified)
    # row's slot (-1: the base; None: every row the base).
    lora_loads: List[Tuple[int, str, str]] = field(default_factory=list)
    decode_adapters: Optional[List[int]] = None


Logits = Tuple[Optional[torch.Tensor], List[torch.Tensor]]


def execute(decode: DecodeStep, plan: StepPlan) -> Logits:
    """Run a plan: decode logits (B, V) (verification: (B, S, V)) or None, and each prefill's logits (last or all
    positions)."""
    model = decode.model
    decoded, prefilled = None, []
    lora = getattr(model, "lora_set", None)
    with torch.inference_mode():
        for row, first, blocks in plan.tables:
            model.assign_blocks(row, first, blocks)
        for slot, name, folder in plan.lora_loads:
            model.lora_slots.load(slot, name, folder)
        try:
            if plan.decode_tokens is not None:
                tokens = torch.tensor(plan.decode_tokens, dtype=torch.long, device=decode.device)
                _select(lora, plan.decode_adapters, 1, decode)
                decoded = decode(tokens, plan.decode_positions)
            if plan.verify_tokens is not None:
                tokens = torch.tensor(plan.verify_tokens, dtype=torch.long, device=decode.device)
                positions = torch.tensor(plan.verify_positions, dtype=torch.long, device=decode.device)
                window = 1 + max(max(row) for row in plan.verify_positions)
                _select(lora, plan.decode_adapters, tokens.shape[1], decode)
                decoded = model.decode_many(tokens, positions, max(window, 1))
            for p in plan.prefills:
                _select(lora, None if p.adapters is None else
                        [s for s, prompt in zip(p.adapters, p.prompts) for _ in prompt], 0, decode)
                if p.start:  # a later chunk of one long prompt, over its row's cached prefix
                    prefilled.append(model.extend(p.prompts[0], p.rows[0], p.start, all_logits=p.all_logits))
                else:
                    prefilled.append(model.prefill(p.prompts, rows=p.rows, all_logits=p.all_logits))
        finally:
            if lora is not None:
                lora.clear()
        if plan.copies:
            model.copy_blocks([a for a, _ in plan.copies], [b for _, b in plan.copies])
    return decoded, prefilled


def _select(lora, slots: Optional[List[int]], per: int, decode: DecodeStep) -> None:
    """Set the LoRA slot of each token of the next model call (slots per row, each for `per` tokens; per=0: per
    token); deterministic steps read every slot, whatever their rows use."""
    if lora is None:
        return
    if slots is None:
        lora.clear()
    else:
        lora.select(slots, per, decode.device, fixed=decode.full_window)


class Runner:
    """Runs each step's plan on this rank; with a channel (rank 0 of a served group) shares it first."""

    def __init__(self, decode: DecodeStep, channel: Optional[Broadcast] = None) -> None:
        self.decode = decode
        self.channel = channel if channel is not None and channel.world > 1 else None

    def run(self, plan: StepPlan) -> Logits:
        if self.channel is not None:
            self.channel.share(plan)
        return execute(self.decode, plan)

    def close(self) -> None:
        """Tell the other ranks that no step follows (they leave `follow`)."""
        if self.channel is not None:
            self.channel.share(None)
            self.channel = None


def follow(decode: DecodeStep, channel: Broadcast) -> None:
    """Ranks other than 0 of a served group: run every plan rank 0 shares, until it shares None."""
    while True:
        plan = channel.share(None)
        if plan is None:
            return
        execute(decode, plan)
