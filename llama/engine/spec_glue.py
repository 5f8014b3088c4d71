"""The engine's use of speculative decoding (speculative.py): drafts for the running choices, one verification
pass over each row's pending token and drafts, and the drafts kept by rules that leave plain decoding's output."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch

from ..model.kv_cache import BLOCK_SIZE
from .runner import StepPlan
from .sampler import log_probs
from .speculative import DraftRow, accept_greedy, accept_sampled, verification
from .state import Choice

log = logging.getLogger("llama.engine")


def _valid(drafts: Sequence[int], vocab_size: int) -> List[int]:
    """A drafter's tokens up to the first that is not a token id of this vocabulary."""
    out = []
    for t in drafts:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            break
        out.append(t)
    return out


def draft(e, running: List[Choice]) -> Optional[Dict[Choice, List[int]]]:
    """Each running row's drafts, at most as many as its max_tokens, the context and its blocks leave room for;
    None when no row has any (the step is then a plain decode)."""
    asks = []
    for c in running:
        room = min(e.speculation.k, c.request.params.max_tokens - c.generated - 1, e.max_seq_len - 1 - c.position,
                   len(c.blocks) * BLOCK_SIZE - 1 - c.position)
        asks.append(DraftRow(c.row, c, list(c.request.prompt) + c.text.tokens, max(room, 0)))
    try:
        proposed = e.speculation.drafter.propose(asks)
    except Exception:  # a failing drafter costs speed, never the answer: decode plainly this step
        log.exception("the drafter failed; decoding this step without drafts")
        return None
    drafts = {c: _valid(d[:a.k], e.vocab_size) for c, d, a in zip(running, proposed, asks)}
    return drafts if any(drafts.values()) else None


def plan_verify(e, plan: StepPlan, running: List[Choice], drafts: Dict[Choice, List[int]]) -> None:
    """One pass over each running row's pending token and drafts (rows 0..the highest busy one; idle rows at
    position -1, the null block)."""
    width = 1 + max(c.row for c in running)
    plan.verify_tokens, plan.verify_positions = verification(
        width, {c.row: (c.pending, c.position, drafts[c]) for c in running}, idle=-1)


def verify(e, running: List[Choice], drafts: Dict[Choice, List[int]], logits: torch.Tensor) -> None:
    """Keep each row's drafts by the rules of speculative.py, emitting every token through `Outputs.take`."""
    spec = e.speculation
    spec.passes += 1
    for c in running:
        d = drafts[c]
        row_logits = logits[c.row, :len(d) + 1]
        wants_lps = c.request.params.logprobs is not None

        def take(token: int, i: int, c=c, row_logits=row_logits, wants_lps=wants_lps) -> bool:
            if not c.done:
                e.outputs.take(c, token, log_probs(row_logits[i]) if wants_lps else None)
            return not c.done

        rule = accept_greedy if c.sampler.generator is None else accept_sampled
        kept = e.guarded(c, lambda c=c, d=d, r=row_logits, rule=rule, take=take: rule(r, d, c.sampler, take))
        spec.proposed += len(d)
        spec.accepted += kept or 0
