"""What runs in one engine step: blocks for the running choices (preempting when none is free), the prompts to
prefill within the token budget, the decode or verification pass, and the block tables' changes, as a StepPlan
(runner.py) with the choices it concerns (Step)."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..model.kv_cache import BLOCK_SIZE, blocks_for
from . import spec_glue
from .runner import Prefill, StepPlan
from .state import Choice

log = logging.getLogger("llama.engine")


@dataclass
class Step:
    """A plan and the choices it concerns."""

    plan: StepPlan
    running: List[Choice] = field(default_factory=list)  # decoded (or verified) this step
    drafts: Optional[Dict[Choice, List[int]]] = None
    groups: List[List[Choice]] = field(default_factory=list)  # whole prompts, one Prefill per group
    chunks: List[Tuple[Choice, int, int]] = field(default_factory=list)  # (choice, start, end): one Prefill each
    forks: Dict[Choice, List[Choice]] = field(default_factory=dict)  # prompts ending: their sibling choices

    @property
    def admitted(self) -> List[Choice]:
        return [c for g in self.groups for c in g] + [c for c, _, _ in self.chunks]


class Planner:
    """Plans each step of one engine (engine.py holds the state it reads and changes)."""

    def __init__(self, engine) -> None:
        self.e = engine

    def plan(self) -> Step:
        e = self.e
        running = self._room([c for c in e.rows.values() if c.prefilled])
        step = Step(StepPlan(), running)
        whole, step.chunks = ([], []) if e.probe and running else self.take_prefills()
        ending = whole + [c for c, _, end in step.chunks if end == len(c.tokens)]
        step.drafts = spec_glue.draft(e, running) if e.speculation is not None and running else None
        if step.drafts is not None:
            spec_glue.plan_verify(e, step.plan, running, step.drafts)
        elif running:
            fixed = e.fixed_shape
            if fixed is None:
                fixed = e.decode.compiled or e.deterministic
            width = e.max_batch_size if fixed else 1 + max(c.row for c in running)
            step.plan.decode_tokens, step.plan.decode_positions = [0] * width, [-1] * width
            for c in running:
                step.plan.decode_tokens[c.row], step.plan.decode_positions[c.row] = c.pending, c.position
        if running and any(c.lora_slot >= 0 for c in running):
            width = len(step.plan.decode_tokens if step.plan.decode_tokens is not None else step.plan.verify_tokens)
            step.plan.decode_adapters = [-1] * width
            for c in running:
                step.plan.decode_adapters[c.row] = c.lora_slot
        step.groups = self.group(whole)
        for group in step.groups:
            step.plan.prefills.append(Prefill([c.tokens for c in group], [c.row for c in group],
                                              all_logits=self.all_logits(group[0]), adapters=_slots(group)))
        for c, start, end in step.chunks:
            step.plan.prefills.append(Prefill([c.tokens[start:end]], [c.row], start=start, adapters=_slots([c])))
        step.forks = {c: self._fork(c, step.plan) for c in ending}
        step.plan.tables, e.table_updates = e.table_updates, []
        step.plan.lora_loads, e.lora_loads = e.lora_loads, []
        return step

    @staticmethod
    def all_logits(c: Choice) -> bool:
        """Whether c's prefill computes every position's logits (prompt log-probs, on its first prefill only)."""
        return bool(c.request.params.prompt_logprobs) and not c.resumed

    def _room(self, running: List[Choice]) -> List[Choice]:
        """Give every running choice the blocks this step writes into (its pending token, and the drafts that
        speculation may add), oldest first. When the pool has none free, the newest running choice is preempted
        (engine.preempt), itself included when it is the newest. Returns those still running."""
        e = self.e
        extra = e.speculation.k if e.speculation is not None else 0
        alive = sorted(running, key=lambda c: c.arrival)
        for c in list(alive):
            if c not in alive:
                continue
            need = blocks_for(min(c.position + 1 + extra, e.max_seq_len))
            while not e.grow(c, need):
                if len(c.blocks) > c.position // BLOCK_SIZE:  # the pending token has its block: drafts wait
                    break
                victim = alive[-1]
                alive.remove(victim)
                self.preempt(victim)
                if victim is c:
                    break
        return alive

    def preempt(self, c: Choice) -> None:
        """Recompute preemption: c keeps its sampler, text and pending token; its full blocks stay in the prefix
        cache; it gives up its row and blocks and waits at the head of the queue."""
        e = self.e
        e.prefix.keep(c, c.held())
        e.release(c)
        c.tokens, c.resumed = c.held(), True
        c.prefilled, c.filled = False, 0
        e.preempted.appendleft(c)
        e.preemptions += 1
        log.info("request %s (choice %d) preempted at %d tokens: no free KV block", c.request.id, c.index,
                 len(c.tokens))

    def resume(self) -> None:
        """Admit preempted choices again, oldest first, while rows and blocks allow."""
        e = self.e
        while e.preempted and e.free_rows() and \
                e.pool.available() >= blocks_for(len(e.preempted[0].tokens) + 1):
            c = e.preempted.popleft()
            e.take_row(c)
            e.prefix.map_cached(c)
            e.grow(c, blocks_for(len(c.tokens) + 1))
            e.to_prefill.appendleft(c)

    def _fork(self, c: Choice, plan: StepPlan) -> List[Choice]:
        """The sibling choices of a prompt whose prefill ends this step share its full blocks by reference and
        get a copy of its partly filled last block (copy on write), after the prefill."""
        e = self.e
        siblings = [s for s in e.rows.values() if s.parent is c]
        full = len(c.request.prompt) // BLOCK_SIZE
        for s in siblings:
            for block in c.blocks[:full]:
                e.pool.ref(block)
            s.blocks = c.blocks[:full] + ([s.cow] if s.cow is not None else [])
            if s.cow is not None:
                plan.copies.append((c.blocks[full], s.cow))
            s.cow = None
            e.table_updates.append((s.row, 0, list(s.blocks)))
        return siblings

    def take_prefills(self) -> Tuple[List[Choice], List[Tuple[Choice, int, int]]]:
        """The prompts prefilled this step, within the token budget: whole prompts (packed together), and chunks
        (choice, start, end) of long ones. Prompts go in order of arrival while they fit. A prompt longer than
        what is left is prefilled in chunks (chunked prefill: running streams keep decoding meanwhile), one
        such prompt per step, which keeps at least half the budget for itself, so the short prompts behind it
        start at once without starving it. A prompt that cannot be chunked (prompt log-probs, or deterministic
        mode, whose arithmetic must not depend on neighbours) waits until it is first, then goes whole."""
        e = self.e
        budget = e.max_prefill_tokens
        queue = [c for c in e.to_prefill if not c.done]
        whole: List[Choice] = []
        chunks: List[Tuple[Choice, int, int]] = []
        long: Optional[Choice] = None
        held = 0
        room = budget
        for c in queue:
            need = len(c.tokens) - c.filled
            if room is None or need <= room:
                (chunks.append((c, c.filled, len(c.tokens))) if c.filled else whole.append(c))
                room = None if room is None else room - need
            elif self.chunkable(c):
                if long is None:
                    long, held = c, room // 2 if room > 1 else room
                    room -= held
            elif not whole and not chunks and long is None:  # the first always goes, however long
                whole.append(c)
                room -= need
            else:
                break  # it goes first at a later step
        if long is not None and room + held > 0:
            chunks.append((long, long.filled, long.filled + room + held))
        ended = set(whole) | {c for c, _, end in chunks if end == len(c.tokens)}
        e.to_prefill = deque(c for c in queue if c not in ended)
        return whole, chunks

    def chunkable(self, c: Choice) -> bool:
        """Whether a prompt may be prefilled over several steps (not with prompt log-probs, which come from one
        pass, nor in deterministic mode, where chunk boundaries would depend on the other prompts)."""
        return not self.e.deterministic and not self.all_logits(c)

    def group(self, admitted: List[Choice]) -> List[List[Choice]]:
        """Packed prefill groups: prompts wanting every position's logits apart from the rest; in deterministic
        mode every prompt alone, so that its arithmetic never depends on its neighbours."""
        if self.e.deterministic:
            return [[c] for c in admitted]
        plain = [c for c in admitted if not self.all_logits(c)]
        full = [c for c in admitted if self.all_logits(c)]
        return [g for g in (plain, full) if g]


def _slots(choices: List[Choice]) -> Optional[List[int]]:
    """The LoRA bank slots of a prefill's prompts, or None when all run on the base."""
    slots = [c.lora_slot for c in choices]
    return slots if any(s >= 0 for s in slots) else None
