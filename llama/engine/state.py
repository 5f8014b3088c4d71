"""What the engine knows about one choice of a request: its row, its blocks, where it is, what it showed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..tokenizer import TextStream
from .events import Request, TokenLogprob
from .sampler import RowSampler
from .stop import StopText


@dataclass(eq=False)
class Choice:
    """One choice of a request. While admitted it holds a row (its index in the decode batch, 0..max_batch_size-1)
    and the pool blocks of its block table; a preempted choice holds neither until it is admitted again."""

    request: Request
    index: int
    sampler: RowSampler
    text: TextStream
    stops: StopText
    arrival: int  # admission order: the newest running choice is preempted first
    row: Optional[int] = None
    parent: Optional["Choice"] = None  # a sibling choice whose prefilled prompt blocks this one shares
    blocks: List[int] = field(default_factory=list)  # its block table: pool block j holds positions 16j..16j+15
    cow: Optional[int] = None  # a sibling's own copy of the parent's partly filled last prompt block
    tokens: List[int] = field(default_factory=list)  # what its prefill fills: the prompt, or after a preemption
    # the prompt and the answer so far (its `pending` token excluded)
    resumed: bool = False  # refilling after a preemption: its prefill's logits are not sampled
    prefilled: bool = False
    filled: int = 0  # tokens in its blocks so far (a long prompt is prefilled in chunks, over several steps)
    position: int = 0  # where `pending` goes
    pending: int = 0  # the last sampled token, decoded at the next step
    generated: int = 0  # tokens sampled so far (a stop token included)
    done: bool = False
    shown: int = 0  # characters of text handed to the sink (what the stop strings let through)
    entries: List[TokenLogprob] = field(default_factory=list)  # log-probs whose text is not shown yet
    lora_slot: int = -1  # the bank slot of its LoRA adapter while it holds one (checkpoints/lora_slots.py); -1: base

    def held(self) -> List[int]:
        """The tokens whose keys and values its blocks hold once prefilled: prompt and answer up to `position`."""
        return (list(self.request.prompt) + self.text.tokens)[:self.position]
