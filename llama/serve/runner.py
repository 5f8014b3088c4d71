"""The model calls of one scheduler step, run the same way on every model-parallel rank.

A step is at most one decode (one token for every cache row 0..B-1) followed by at most one packed prefill of
newly admitted prompts into free rows. The decode comes first: idle rows decode a dummy token at position 0 of
their own row, and a row admitted in this step must have that slot rewritten by its prefill, not the reverse.
Rank 0 plans the step; under torchrun it first shares the plan (plain lists of ints) with the other ranks,
which run exactly the same calls (`follow`). Sampling happens on rank 0 only: the sampled tokens reach the
other ranks in the next plan, so no rank needs the requests' generators.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..distributed import Broadcast
from ..generation import Llama


@dataclass
class StepPlan:
    """What the model runs in one step."""

    decode_tokens: Optional[List[int]] = None  # one token per cache row 0..B-1; None: no decode this step
    decode_positions: Optional[List[int]] = None  # where each row's token goes
    prefill_prompts: List[List[int]] = field(default_factory=list)
    prefill_rows: List[int] = field(default_factory=list)  # the cache row each prompt fills from position 0


Logits = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def execute(generator: Llama, plan: StepPlan) -> Logits:
    """Run a plan: (decode logits (B, V) or None, prefill logits (len(prompts), V) or None)."""
    decoded = prefilled = None
    with torch.inference_mode():
        if plan.decode_tokens is not None:
            tokens = torch.tensor(plan.decode_tokens, dtype=torch.long, device=generator.device)
            decoded = generator.decode_step(tokens, plan.decode_positions)
        if plan.prefill_prompts:
            prefilled = generator.model.prefill(plan.prefill_prompts, rows=plan.prefill_rows)
    return decoded, prefilled


class StepRunner:
    """Runs each step's plan on this rank, after sharing it with the others when there are any (rank 0)."""

    def __init__(self, generator: Llama, channel: Optional[Broadcast] = None) -> None:
        self.generator = generator
        self.channel = channel if channel is not None and channel.world > 1 else None

    def run(self, plan: StepPlan) -> Logits:
        if self.channel is not None:
            self.channel.share(plan)
        return execute(self.generator, plan)

    def close(self) -> None:
        """Tell the other ranks that no step follows (they leave `follow`)."""
        if self.channel is not None:
            self.channel.share(None)
            self.channel = None


def follow(generator: Llama, channel: Broadcast) -> None:
    """Ranks other than 0: run every step rank 0 shares, until it shares None."""
    while True:
        plan = channel.share(None)
        if plan is None:
            return
        execute(generator, plan)
