"""The engine: every generation, the library's and the server's, runs here.

The engine owns the rows of the decode batch and, through the model's block pool (blocks.py), the blocks of the
paged KV cache (llama/model/kv_cache.py). A request added with `add` takes n rows (one per choice) and the blocks of
its prompt (a prefix-cache hit maps cached blocks by reference); each `step`
  1. frees the rows and blocks of cancelled requests and admits preempted choices again when blocks allow,
  2. plans (planner.py): gives each running choice the blocks this step writes into, preempting the newest
     running choice when none is free; picks the prompts to prefill within max_prefill_tokens (chunking long
     ones, chunked prefill); a decode step for every running row, or with speculation a verification pass,
  3. runs the plan (runner.py),
  4. turns the logits into tokens, text and events (outputs.py), and keeps each finished prompt's and answer's
     full blocks in the prefix cache (prefix_glue.py).
With speculation (speculative.py, spec_glue.py) step 2 drafts tokens and step 4 keeps drafts by rules that leave
the output plain decoding's.

Preemption (vLLM's recompute): a preempted choice gives up its row and blocks, waits at the head of the queue,
and when admitted again prefills its prompt and answer so far (its full blocks usually still in the prefix
cache) without sampling, then decodes its pending token: its stream goes on with the same tokens.

A failure inside one request (its sampling, text or sink) ends that request alone with an 'error' event; only
a failing model call, which leaves the cache in doubt, ends every request (`failure` is then set).

Deterministic mode makes a request's tokens independent of whatever else is in the batch: every decode step
has one shape (all rows, attending over the whole context, masked) and every prompt is prefilled alone. It runs
without the prefix cache: a prompt's arithmetic would then depend on which earlier requests shared its start.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Deque, Dict, List, Optional, Sequence

import torch

from ..model.decode_step import DecodeStep
from ..model.kv_cache import BLOCK_SIZE, blocks_for
from ..tokenizer import TextStream
from .blocks import BlockPool, for_model as pool_for
from .admission import check, check_prefill_budget
from .events import Event, Finished, Request
from .outputs import Outputs
from .params import SEED_BITS, SamplingParams
from .planner import Planner
from .prefix_cache import PrefixCache
from .prefix_glue import PrefixGlue
from .runner import Runner
from .sampler import RowSampler
from .speculative import Speculation
from .state import Choice
from .stop import StopText

log = logging.getLogger("llama.engine")

MAX_FAILED_STEPS = 3  # model calls failing in a row that stop the engine


class Engine:
    """See the module docstring. One thread calls `add`, `step` and `fail`; `request.cancelled` may be set from
    any thread."""

    def __init__(self, decode: DecodeStep, tokenizer, stop_ids: Sequence[int], runner: Optional[Runner] = None,
                 deterministic: bool = False, max_prefill_tokens: Optional[int] = None, seed: int = 0,
                 fixed_shape: Optional[bool] = None, speculation: Optional[Speculation] = None,
                 prefix_cache: Optional[PrefixCache] = None) -> None:
        """fixed_shape: decode all rows every step (True) or rows 0..the highest busy one (False); None: fixed
        when the step is compiled (CUDA graphs replay one shape) or deterministic. speculation: draft tokens
        and verify them (llama/engine/speculative.py); not with deterministic mode or a compiled step.
        prefix_cache: the prefix cache over the model's block pool (prefix_cache.for_model), shared by every
        engine over that model; None: every prompt is prefilled whole."""
        self.decode = decode
        self.model = decode.model
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.runner = runner if runner is not None else Runner(decode)
        self.deterministic = deterministic
        self.max_prefill_tokens = check_prefill_budget(max_prefill_tokens)
        self.fixed_shape = fixed_shape
        self.max_batch_size = self.model.params.max_batch_size
        self.max_seq_len = self.model.params.max_seq_len
        self.vocab_size = self.model.params.vocab_size
        self._seeds = random.Random(seed)
        self._arrivals = 0
        self.rows: Dict[int, Choice] = {}  # admitted choices by row
        self.to_prefill: Deque[Choice] = deque()
        self.preempted: Deque[Choice] = deque()  # waiting to be admitted again, before any new request
        self.table_updates: List[tuple] = []  # block-table changes for the next plan
        self.preemptions = 0
        self.failure: Optional[str] = None
        self.steps = 0
        self._failed_steps = 0  # model calls that failed in a row
        self.probe = False  # after a failed step with prefills: the next step only decodes (see _step_failed)
        if speculation is not None and (deterministic or decode.compiled or fixed_shape):
            raise ValueError("speculative decoding needs an eager, non-deterministic engine: its verification "
                             "passes change shape, which deterministic mode and compiled steps do not allow")
        self.speculation = speculation
        if prefix_cache is not None and deterministic:
            raise ValueError("the prefix cache cannot run in deterministic mode: a prompt's arithmetic would "
                             "depend on which earlier requests shared its start")
        self.prefix_cache = prefix_cache
        self.pool: BlockPool = prefix_cache.pool if prefix_cache is not None else pool_for(self.model)
        self.prefix = PrefixGlue(self)
        self.loras = getattr(self.model, "lora_slots", None)  # per-request LoRA adapters (lora_slots.py), if any
        self.lora_loads: List[tuple] = []  # (slot, name, folder) to load before the next plan's model calls
        self.planner = Planner(self)
        self.outputs = Outputs(self)

    # --- requests in ---------------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """ValueError unless the request can run (admission.check)."""
        check(prompt, params, self.vocab_size, self.max_batch_size, self.max_seq_len, self.pool.usable)

    def free_rows(self) -> int:
        return self.max_batch_size - len(self.rows)

    @property
    def running(self) -> int:
        """Choices holding rows."""
        return len(self.rows)

    @property
    def waiting(self) -> int:
        """Preempted choices waiting to be admitted again."""
        return len(self.preempted)

    def _prompt_blocks(self, length: int, n: int) -> int:
        """Blocks a request takes at admission: its prompt's, and a copy of a partly filled last block per
        further choice."""
        return blocks_for(length) + (n - 1) * (1 if length % BLOCK_SIZE else 0)

    def can_add(self, request: Request, adapter: bool = True) -> bool:
        """Whether `add` would take the request now: no preempted choice waits, rows and blocks are free, and (but
        with adapter=False) a slot for its LoRA adapter. admission.next_admissible picks from a queue."""
        n = request.params.n
        return not self.preempted and self.free_rows() >= n and \
            self.pool.available() >= self._prompt_blocks(len(request.prompt), n) and \
            (not adapter or request.lora is None or self.loras is None or self.loras.available(request.lora))

    def check_lora(self, name: Optional[str]) -> None:
        """ValueError unless `name` is None or an adapter this model serves."""
        if name is not None and (self.loras is None or name not in self.loras.paths):
            served = self.loras.names if self.loras is not None else []
            raise ValueError(f"LoRA adapter {name!r} is not loaded; loaded: {served}")

    def add(self, request: Request) -> None:
        """Give a checked request its n rows and its prompt's blocks; it is prefilled at the next step.
        ValueError when it cannot run, RuntimeError when rows or blocks are short (callers ask `can_add`)."""
        self.check(request.prompt, request.params)
        self.check_lora(request.lora)
        n = request.params.n
        if not self.can_add(request):
            raise RuntimeError(f"{n} rows and {self._prompt_blocks(len(request.prompt), n)} blocks asked for, "
                               f"{self.free_rows()} rows and {self.pool.available()} blocks free")
        first: Optional[Choice] = None
        for index in range(n):
            c = self._new_choice(request, index, first)
            if request.lora is not None:
                c.lora_slot, load = self.loras.acquire(request.lora)
                if load is not None:
                    self.lora_loads.append((c.lora_slot, request.lora, load))
            self.take_row(c)
            if first is None:
                first = c
                self.prefix.map_cached(c)
                self.grow(c, blocks_for(len(c.tokens)))
                self.to_prefill.append(c)
            elif len(request.prompt) % BLOCK_SIZE:
                c.cow = self.pool.allocate()

    def _new_choice(self, request: Request, index: int, parent: Optional[Choice]) -> Choice:
        params = request.params
        seed = params.seed_for(index)
        if seed is None:
            seed = self._seeds.getrandbits(SEED_BITS)
        sampler = RowSampler(params, request.prompt, seed, self.decode.device)
        text = TextStream(self.tokenizer, request.prompt if request.continues_prompt else ())
        self._arrivals += 1
        return Choice(request, index, sampler, text, StopText(params.stop), self._arrivals, parent=parent,
                      tokens=list(request.prompt), position=len(request.prompt))

    # --- rows and blocks -----------------------------------------------------------------------------------

    def take_row(self, c: Choice) -> None:
        c.row = next(row for row in range(self.max_batch_size) if row not in self.rows)
        self.rows[c.row] = c

    def grow(self, c: Choice, blocks: int) -> bool:
        """Give c blocks until it has `blocks`; False (and the blocks given so far kept) when none is free."""
        first = len(c.blocks)
        while len(c.blocks) < blocks:
            block = self.pool.allocate()
            if block is None:
                break
            c.blocks.append(block)
        if len(c.blocks) > first:
            self.table_updates.append((c.row, first, c.blocks[first:]))
        return len(c.blocks) >= blocks

    def release(self, c: Choice) -> None:
        """c's row and blocks go back (finished or preempted); its row's table is emptied at the next step."""
        for block in c.blocks:
            self.pool.unref(block)
        if c.cow is not None:
            self.pool.unref(c.cow)
        c.blocks, c.cow = [], None
        if c.row is not None and self.rows.get(c.row) is c:
            del self.rows[c.row]
            self.table_updates.append((c.row, 0, []))
        c.row = None

    # --- steps ---------------------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.preempted)

    @torch.inference_mode()
    def step(self) -> bool:
        """One step (see the module docstring). False when there was nothing to do."""
        self._free_cancelled()
        self.planner.resume()
        if not self.rows:
            return False
        self.steps += 1
        step = self.planner.plan()
        try:
            decoded, prefilled = self.runner.run(step.plan)
        except Exception as err:
            self.table_updates[:0] = step.plan.tables  # whether they reached the model is unknown: sent again
            self.lora_loads[:0] = step.plan.lora_loads
            self._step_failed(err, step.admitted)
            return True
        self._failed_steps, self.probe = 0, False
        self.outputs.process(step, decoded, prefilled)
        return True

    # --- ends ----------------------------------------------------------------------------------------------

    def _free_cancelled(self) -> None:
        for c in list(self.rows.values()) + list(self.preempted):
            if c.request.cancelled and not c.done:
                self.finish_cancelled(c)

    def finish_cancelled(self, c: Choice) -> None:
        """A cancelled choice ends as 'cancelled', or as 'abort' (with its message) when its server aborted it."""
        self.finish(c, "abort", c.request.aborted) if c.request.aborted else self.finish(c, "cancelled")

    def finish(self, c: Choice, reason: str, message: str = "") -> None:
        """A choice's last event; its row and blocks are free from now on (its full blocks stay in the prefix
        cache). completion_tokens counts the answer's tokens (a final stop token is not one)."""
        if c.done:
            return
        c.done = True
        if c in self.preempted:
            self.preempted.remove(c)
        if reason in ("stop", "length") and c.prefilled:
            # the blocks hold the KV of the prompt and of every sampled token but the last (never decoded)
            self.prefix.keep(c, (list(c.request.prompt) + c.text.tokens)[:len(c.request.prompt) + c.generated - 1])
        self.release(c)
        if c.lora_slot >= 0:
            self.loras.release(c.lora_slot)
            c.lora_slot = -1
        for sibling in [s for s in self.rows.values() if s.parent is c and not s.prefilled]:
            self.finish(sibling, reason, message)  # a choice whose prefill never ran cannot go on either
        self.outputs.emit(c, Finished(reason, len(c.request.prompt), len(c.text.tokens), message, index=c.index))

    def _step_failed(self, err: Exception, admitted: List[Choice]) -> None:
        """A model call failed. With prefills in the step, the prompts are the suspects: those requests end with
        an error and free their rows, and the next step prefills nothing, so that its decode alone tells a bad
        prompt from a broken model. The running rows decode the same token at the same position again (the
        same cache entries rewritten), so they lose nothing. A failing step without prefills, or
        MAX_FAILED_STEPS failing steps in a row, mean the model cannot serve: every request ends, and `failure`
        is set."""
        self._failed_steps += 1
        if not admitted or self._failed_steps >= MAX_FAILED_STEPS:
            log.exception("the model call failed; the engine stops")
            self.fail(f"the model failed: {type(err).__name__}: {err}")
            return
        log.exception("a step with %d prefill(s) failed; ending those requests", len(admitted))
        self.probe = True
        for c in admitted:
            for member in [c] + [s for s in list(self.rows.values()) if s.parent is c]:
                self.finish(member, "error", f"the prompt's prefill failed: {type(err).__name__}: {err}")

    def fail(self, message: str) -> None:
        """End every request with an 'error' event: the engine cannot serve (a model call failed)."""
        self.failure = message
        for c in list(self.rows.values()) + list(self.preempted):
            self.finish(c, "error", message)
        self.to_prefill.clear()

    def guarded(self, c: Choice, work):
        """Run one choice's work; whatever it raises ends that request alone (all its choices), with an error
        event naming what went wrong, and the other requests go on."""
        try:
            return work()
        except Exception as err:
            log.exception("request %s failed; ending it alone", c.request.id)
            c.request.cancelled = True
            for other in [o for o in list(self.rows.values()) if o.request is c.request] + [c]:
                if not other.done:
                    self.finish(other, "error", f"{type(err).__name__}: {err}")
            return None

    def emit(self, c: Choice, event: Event) -> None:
        self.outputs.emit(c, event)
