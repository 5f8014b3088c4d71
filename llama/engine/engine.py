"""The row engine: every generation, the library's and the server's, runs here.

The engine owns the KV cache's rows. A request added with `add` takes n rows (one per choice); each `step`
  1. frees the rows of cancelled requests,
  2. plans one decode step for every running row (an idle row below the highest busy one decodes a dummy
     token at position 0 of its own row; a fixed-shape step, compiled or deterministic, decodes all rows),
  3. copies the longest cached run of each newly added prompt's full blocks into its row (the prefix cache,
     prefix_cache.py), so that only the rest is prefilled;
     prefills newly added prompts in one packed pass (at most max_prefill_tokens tokens in all); a prompt longer
     than the budget is prefilled in chunks over several steps, interleaved with the decode steps of running
     rows (chunked prefill), then copies each prefilled row into its sibling choices' rows,
  4. samples each row's next token with that request's own parameters and generator, turns tokens into text,
     applies stop tokens, stop strings and lengths, and hands events to the request's sink,
  5. frees finished rows at once,
  6. copies the new full blocks of each prompt just prefilled, and of each answer just ended, from its row
     into the prefix cache's pool, for later requests that start the same way.
With speculation (speculative.py) step 2 becomes one pass over each running row's pending token and its drafted
tokens, and step 4 keeps drafts by rules that leave the output plain decoding's.
A failure inside one request (its sampling, text or sink) ends that request alone with an 'error' event; only
a failing model call, which leaves the cache in doubt, ends every request (`failure` is then set).

Deterministic mode makes a request's tokens independent of whatever else is in the batch: every decode step
has one shape (all rows, attending over the whole context) and every prompt is prefilled alone. It runs without
the prefix cache: a prompt's arithmetic would then depend on which earlier requests shared its start.

The engine knows rows and positions; the callers know requests: `Llama` adds its prompts and steps until
they finish; the server's scheduler keeps a queue and a thread and adds requests as rows free up.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch

from ..model.decode_step import DecodeStep
from ..tokenizer import TextStream
from .events import Chunk, Event, Finished, Request, TokenLogprob, token_text, top_entries
from .params import SEED_BITS, ParamError, SamplingParams, check_prompt
from .prefix_cache import PrefixCache
from .runner import Prefill, Runner, StepPlan
from .sampler import RowSampler, choose, log_probs
from .speculative import DraftRow, Speculation, accept_greedy, accept_sampled, verification
from .stop import StopText

log = logging.getLogger("llama.engine")

MAX_FAILED_STEPS = 3  # model calls failing in a row that stop the engine


@dataclass(eq=False)
class _Choice:
    """One choice of a request, holding a cache row."""

    request: Request
    index: int
    row: int
    sampler: RowSampler
    text: TextStream
    stops: StopText
    parent: Optional["_Choice"] = None  # a sibling choice whose prefilled row this one copies
    prefilled: bool = False
    looked_up: bool = False  # the prefix cache was asked for this prompt
    filled: int = 0  # prompt tokens in the row so far (a long prompt is prefilled in chunks, over several steps)
    position: int = 0  # where `pending` goes in the row
    pending: int = 0  # the last sampled token, decoded at the next step
    generated: int = 0  # tokens sampled so far (a stop token included)
    done: bool = False
    shown: int = 0  # characters of text handed to the sink (what the stop strings let through)
    entries: List[TokenLogprob] = field(default_factory=list)  # log-probs whose text is not shown yet


def _valid(drafts: Sequence[int], vocab_size: int) -> List[int]:
    """A drafter's tokens up to the first that is not a token id of this vocabulary."""
    out = []
    for t in drafts:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            break
        out.append(t)
    return out


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
        prefix_cache: the block table of the model's block pool (prefix_cache.py; the model's `setup_blocks`
        made the pool), shared by every engine over that model; None: every prompt is prefilled whole."""
        if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int)
                                               or isinstance(max_prefill_tokens, bool) or max_prefill_tokens < 1):
            raise ValueError(f"max_prefill_tokens must be a positive integer or None, got {max_prefill_tokens!r}")
        self.decode = decode
        self.model = decode.model
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.runner = runner if runner is not None else Runner(decode)
        self.deterministic = deterministic
        self.max_prefill_tokens = max_prefill_tokens
        self.fixed_shape = fixed_shape
        self.max_batch_size = self.model.params.max_batch_size
        self.max_seq_len = self.model.params.max_seq_len
        self.vocab_size = self.model.params.vocab_size
        self._seeds = random.Random(seed)
        self._rows: Dict[int, _Choice] = {}
        self._to_prefill: Deque[_Choice] = deque()
        self.failure: Optional[str] = None
        self.steps = 0
        self._failed_steps = 0  # model calls that failed in a row
        self._probe = False  # after a failed step with prefills: the next step only decodes (see _step_failed)
        if speculation is not None and (deterministic or decode.compiled or fixed_shape):
            raise ValueError("speculative decoding needs an eager, non-deterministic engine: its verification "
                             "passes change shape, which deterministic mode and compiled steps do not allow")
        self.speculation = speculation
        if prefix_cache is not None and deterministic:
            raise ValueError("the prefix cache cannot run in deterministic mode: a prompt's arithmetic would "
                             "depend on which earlier requests shared its start")
        self.prefix_cache = prefix_cache
        self._saves: List[Tuple[int, List[int]]] = []  # rows of answers just ended: (row, tokens with KV in it)

    # --- requests in ---------------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """ValueError unless the request can run: token ids in the vocabulary, parameters in range, room in the
        context for prompt plus max_tokens, and no more choices than rows."""
        check_prompt(prompt, self.vocab_size)
        params.check(self.vocab_size)
        if params.n > self.max_batch_size:
            raise ParamError(f"n={params.n} choices need as many cache rows; there are {self.max_batch_size} "
                             "(max_batch_size)", "n")
        if len(prompt) > self.max_seq_len or (params.max_tokens and len(prompt) >= self.max_seq_len):
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context (max_seq_len) holds "
                             f"{self.max_seq_len} with the answer, so prompts may have up to {self.max_seq_len - 1}")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} exceed the "
                             f"context (max_seq_len {self.max_seq_len}): ask for at most "
                             f"{self.max_seq_len - len(prompt)}")

    def free_rows(self) -> int:
        return self.max_batch_size - len(self._rows)

    @property
    def running(self) -> int:
        """Requests' choices holding rows."""
        return len(self._rows)

    def add(self, request: Request) -> None:
        """Give a checked request its n rows; it is prefilled at the next step. ValueError when it cannot run,
        RuntimeError when fewer rows are free than it has choices (callers admit only when `free_rows` allows)."""
        self.check(request.prompt, request.params)
        n = request.params.n
        free = [row for row in range(self.max_batch_size) if row not in self._rows]
        if len(free) < n:
            raise RuntimeError(f"{n} rows asked for, {len(free)} free")
        first: Optional[_Choice] = None
        for index, row in enumerate(free[:n]):
            choice = self._new_choice(request, index, row, first)
            self._rows[row] = choice
            if first is None:
                first = choice
                self._to_prefill.append(choice)

    def _new_choice(self, request: Request, index: int, row: int, parent: Optional["_Choice"]) -> _Choice:
        params = request.params
        seed = params.seed_for(index)
        if seed is None:
            seed = self._seeds.getrandbits(SEED_BITS)
        sampler = RowSampler(params, request.prompt, seed, self.decode.device)
        text = TextStream(self.tokenizer, request.prompt if request.continues_prompt else ())
        return _Choice(request, index, row, sampler, text, StopText(params.stop), parent=parent,
                       position=len(request.prompt))

    # --- steps ---------------------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._rows)

    @torch.inference_mode()
    def step(self) -> bool:
        """One step (see the module docstring). False when there was nothing to do."""
        self._free_cancelled()
        if not self._rows:
            return False
        self.steps += 1
        running = [c for c in self._rows.values() if c.prefilled]
        loaded: List[Tuple[_Choice, List[int]]] = []
        if self._probe and running:
            whole, chunks = [], []
        else:
            loaded = self._lookup()
            whole, chunks = self._take_prefills()
        admitted = whole + [c for c, _, _ in chunks]
        ending = whole + [c for c, _, end in chunks if end == len(c.request.prompt)]  # prefilled by this step
        plan = StepPlan()
        drafts = self._draft(running) if self.speculation is not None and running else None
        if drafts is not None:
            self._plan_verify(plan, running, drafts)
        elif running:
            fixed = self.fixed_shape
            if fixed is None:
                fixed = self.decode.compiled or self.deterministic
            width = self.max_batch_size if fixed else 1 + max(c.row for c in running)
            plan.decode_tokens, plan.decode_positions = [0] * width, [0] * width
            for c in running:
                plan.decode_tokens[c.row], plan.decode_positions[c.row] = c.pending, c.position
            for c in self._rows.values():  # a row part-way through its prompt: its idle decode writes where
                if c.filled and not c.prefilled and c.row < width:  # its next chunk writes, never on its prefix
                    plan.decode_positions[c.row] = c.filled
        groups = self._group(whole)
        for group in groups:
            plan.prefills.append(Prefill([c.request.prompt for c in group], [c.row for c in group],
                                         all_logits=group[0].request.params.prompt_logprobs))
        for c, start, end in chunks:
            plan.prefills.append(Prefill([c.request.prompt[start:end]], [c.row], start=start))
        forks = {c: [s for s in self._rows.values() if s.parent is c] for c in ending}
        plan.copies = [(c.row, [s.row for s in sibs], len(c.request.prompt)) for c, sibs in forks.items() if sibs]
        plan.loads = [(c.row, blocks) for c, blocks in loaded]
        reserved = self._plan_saves(plan, [(c.row, c.request.prompt) for c in ending])
        try:
            decoded, prefilled = self.runner.run(plan)
        except Exception as err:
            if reserved:
                self.prefix_cache.release(reserved)
            for c, _ in loaded:  # whether its blocks reached its row is unknown: it starts over
                c.filled, c.looked_up = 0, False
            self._step_failed(err, admitted)
            return True
        if reserved:
            self.prefix_cache.commit(reserved)
        self._failed_steps, self._probe = 0, False
        order: List[_Choice] = [] if drafts is not None else list(running)
        rows: List[torch.Tensor] = []
        if drafts is not None:
            self._verify(running, drafts, decoded)
        elif running:
            rows.append(decoded[torch.tensor([c.row for c in running], device=decoded.device)])
        for c, _, end in chunks:
            c.filled = end
        done = [(group, self._prefill_logits(group, logits)) for group, logits in zip(groups, prefilled)]
        done += [([c], [logits[-1]]) for (c, _, end), logits in zip(chunks, prefilled[len(groups):])
                 if end == len(c.request.prompt)]
        for group, last in done:
            for c, row_logits in zip(group, last):
                family = [c] + forks[c]
                for member in family:
                    member.prefilled = True
                order += family
                rows.append(row_logits.unsqueeze(0).expand(len(family), -1))
        self._advance(order, torch.cat(rows) if rows else None)
        self._save_answers()
        return True

    # --- the prefix cache (llama/engine/prefix_cache.py) -------------------------------------------------------

    def _lookup(self) -> List[Tuple[_Choice, List[int]]]:
        """Ask the prefix cache once for each waiting prompt: a hit's blocks are copied into its row in this
        step (before the prefills) and the prompt counts as filled that far, so only the rest is prefilled.
        Prompts wanting every position's log-probs are prefilled whole."""
        if self.prefix_cache is None:
            return []
        out = []
        for c in self._to_prefill:
            if c.done or c.looked_up or c.filled or c.request.params.prompt_logprobs:
                continue
            c.looked_up = True
            blocks = self.prefix_cache.lookup(c.request.prompt)
            if blocks:
                c.filled = len(blocks) * self.prefix_cache.block_size
                out.append((c, blocks))
        return out

    def _plan_saves(self, plan: StepPlan, rows: List[Tuple[int, Sequence[int]]]) -> list:
        """Reserve pool blocks for the new full blocks of each (row, tokens whose KV the row holds once the plan
        ran) and add their copies to the plan; the reservations are committed once the plan has run."""
        if self.prefix_cache is None:
            return []
        size, reserved = self.prefix_cache.block_size, []
        for row, tokens in rows:
            blocks = self.prefix_cache.reserve(tokens)
            if blocks:
                plan.saves.append((row, [i * size for i, _, _ in blocks], [b for _, b, _ in blocks]))
                reserved += blocks
        return reserved

    def _save_answers(self) -> None:
        """Copy the rows of answers that ended in this step into the pool (a later turn of the conversation
        starts with prompt + answer), before any other request can take those rows."""
        if not self._saves:
            return
        plan = StepPlan()
        saves, self._saves = self._saves, []
        reserved = self._plan_saves(plan, saves)
        if not reserved:
            return
        try:
            self.runner.run(plan)
        except Exception:  # a lost copy costs a later prefill, never an answer
            log.exception("copying ended answers into the prefix cache failed")
            self.prefix_cache.release(reserved)
            return
        self.prefix_cache.commit(reserved)

    # --- speculative decoding (llama/engine/speculative.py) ---------------------------------------------------

    def _draft(self, running: List[_Choice]) -> Optional[Dict[_Choice, List[int]]]:
        """Each running row's drafts, at most as many as its max_tokens and the context leave room for; None
        when no row has any (the step is then a plain decode)."""
        asks = []
        for c in running:
            room = min(self.speculation.k, c.request.params.max_tokens - c.generated - 1,
                       self.max_seq_len - 1 - c.position)
            asks.append(DraftRow(c.row, c, list(c.request.prompt) + c.text.tokens, max(room, 0)))
        try:
            proposed = self.speculation.drafter.propose(asks)
        except Exception:  # a failing drafter costs speed, never the answer: decode plainly this step
            log.exception("the drafter failed; decoding this step without drafts")
            return None
        drafts = {c: _valid(d[:a.k], self.vocab_size) for c, d, a in zip(running, proposed, asks)}
        return drafts if any(drafts.values()) else None

    def _plan_verify(self, plan: StepPlan, running: List[_Choice], drafts: Dict[_Choice, List[int]]) -> None:
        """One pass over each running row's pending token and drafts (rows 0..the highest busy one)."""
        width = 1 + max(c.row for c in running)
        plan.verify_tokens, plan.verify_positions = verification(
            width, {c.row: (c.pending, c.position, drafts[c]) for c in running})
        for c in self._rows.values():  # a row part-way through its prompt: its idle entries write where its
            if c.filled and not c.prefilled and c.row < width:  # next chunk writes, never on its cached prefix
                plan.verify_positions[c.row] = [c.filled] * len(plan.verify_positions[c.row])

    def _verify(self, running: List[_Choice], drafts: Dict[_Choice, List[int]], logits: torch.Tensor) -> None:
        """Keep each row's drafts by the rules of speculative.py, emitting every token through `_take`."""
        spec = self.speculation
        spec.passes += 1
        for c in running:
            d = drafts[c]
            row_logits = logits[c.row, :len(d) + 1]
            wants_lps = c.request.params.logprobs is not None

            def take(token: int, i: int, c=c, row_logits=row_logits, wants_lps=wants_lps) -> bool:
                if not c.done:
                    self._take(c, token, log_probs(row_logits[i]) if wants_lps else None)
                return not c.done

            rule = accept_greedy if c.sampler.generator is None else accept_sampled
            kept = self._guarded(c, lambda c=c, d=d, r=row_logits, rule=rule, take=take: rule(r, d, c.sampler, take))
            spec.proposed += len(d)
            spec.accepted += kept or 0

    def _take_prefills(self) -> Tuple[List[_Choice], List[Tuple[_Choice, int, int]]]:
        """The prompts prefilled this step, within the token budget: whole prompts (packed together), and chunks
        (choice, start, end) of long ones. Prompts go in order of arrival while they fit. A prompt longer than
        what is left is prefilled in chunks (chunked prefill: running streams keep decoding meanwhile), one
        such prompt per step, which keeps at least half the budget for itself, so the short prompts behind it
        start at once without starving it. A prompt that cannot be chunked (prompt log-probs, or deterministic
        mode, whose arithmetic must not depend on neighbours) waits until it is first, then goes whole."""
        budget = self.max_prefill_tokens
        queue = [c for c in self._to_prefill if not c.done]
        whole: List[_Choice] = []
        chunks: List[Tuple[_Choice, int, int]] = []
        long: Optional[_Choice] = None
        held = 0
        room = budget
        for c in queue:
            need = len(c.request.prompt) - c.filled
            if room is None or need <= room:
                (chunks.append((c, c.filled, len(c.request.prompt))) if c.filled else whole.append(c))
                room = None if room is None else room - need
            elif self._chunkable(c):
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
        ended = set(whole) | {c for c, _, end in chunks if end == len(c.request.prompt)}
        self._to_prefill = deque(c for c in queue if c not in ended)
        return whole, chunks

    def _chunkable(self, c: _Choice) -> bool:
        """Whether a prompt may be prefilled over several steps (not with prompt log-probs, which come from one
        pass, nor in deterministic mode, where chunk boundaries would depend on the other prompts)."""
        return not self.deterministic and not c.request.params.prompt_logprobs

    def _group(self, admitted: List[_Choice]) -> List[List[_Choice]]:
        """Packed prefill groups: prompts wanting every position's logits apart from the rest; in deterministic
        mode every prompt alone, so that its arithmetic never depends on its neighbours."""
        if self.deterministic:
            return [[c] for c in admitted]
        plain = [c for c in admitted if not c.request.params.prompt_logprobs]
        full = [c for c in admitted if c.request.params.prompt_logprobs]
        return [g for g in (plain, full) if g]

    def _prefill_logits(self, group: List[_Choice], logits: torch.Tensor) -> List[torch.Tensor]:
        """Each prompt's last-position logits; with every position's logits, its prompt log-probs go out first."""
        if not group[0].request.params.prompt_logprobs:
            return list(logits)
        out, start = [], 0
        for c in group:
            end = start + len(c.request.prompt)
            prompt = torch.tensor(c.request.prompt[1:], device=logits.device).unsqueeze(-1)
            lps = log_probs(logits[start:end - 1])
            values = lps.gather(-1, prompt).squeeze(-1).tolist()
            top = self._prompt_top(lps, c.request.params.logprobs)
            self._guarded(c, lambda c=c, v=values, t=top: self._emit(c, Chunk("", prompt_logprobs=[0.0] + v,
                                                                              prompt_top=t, index=c.index)))
            out.append(logits[end - 1])
            start = end
        return out

    def _prompt_top(self, lps: torch.Tensor, k: Optional[int]) -> Optional[List[List[Tuple[str, List[int], float]]]]:
        """The k likeliest tokens at each prompt position after the first (None when no logprobs were asked)."""
        if k is None:
            return None
        if not k or not len(lps):
            return [[] for _ in range(len(lps) + 1)]
        values, ids = torch.topk(lps, k, dim=-1)
        return [[]] + [top_entries(self.tokenizer, v, i) for v, i in zip(values.tolist(), ids.tolist())]

    def _advance(self, order: List[_Choice], logits: Optional[torch.Tensor]) -> None:
        """Sample each choice's next token (rows of `logits` in `order`), emit, and finish choices."""
        keep = [i for i, c in enumerate(order) if not c.done and c.request.params.max_tokens > 0]
        live = [order[i] for i in keep]
        if logits is not None and live:
            logits = logits[torch.tensor(keep, device=logits.device)] if len(keep) < len(order) else logits
            try:
                tokens = choose(logits, [c.sampler for c in live])
            except Exception as err:  # a sampler's own failure: sample row by row to find whose it was
                log.warning("batched sampling failed (%s); sampling row by row", err)
                tokens = [self._guarded(c, lambda c=c, i=i: choose(logits[i:i + 1], [c.sampler])[0])
                          for i, c in enumerate(live)]
            wanted = [i for i, c in enumerate(live) if c.request.params.logprobs is not None and tokens[i] is not None]
            lps = log_probs(logits[torch.tensor(wanted, device=logits.device)]) if wanted else None
            infos = {i: lps[j] for j, i in enumerate(wanted)}
            for i, c in enumerate(live):
                if tokens[i] is not None and not c.done:
                    self._guarded(c, lambda c=c, t=tokens[i], lp=infos.get(i): self._take(c, t, lp))
        for c in order:  # max_tokens 0: nothing to sample after the prefill
            if not c.done and c.request.params.max_tokens == 0:
                self._finish(c, "length")

    def _take(self, c: _Choice, token: int, lps: Optional[torch.Tensor]) -> None:
        """One sampled token of one choice: its log-prob entry, its text, its stop conditions, its event."""
        params = c.request.params
        c.generated += 1
        c.sampler.record(token)
        if c.request.cancelled:
            return self._finish_cancelled(c)
        if (token in self.stop_ids and token not in params.ignore_stop_ids) or token in params.stop_token_ids:
            # the end: no entry, no text of its own
            self._show(c, c.stops.feed(c.text.finish())[0] + c.stops.flush(), [], final=True)
            return self._finish(c, "stop")
        if lps is not None:
            c.entries.append(self._token_logprob(lps, token, params.logprobs, c.text.offset))
        text, stopped = c.stops.feed(c.text.push(token))
        if stopped:
            self._show(c, text, [token], final=True, cut=True)
            return self._finish(c, "stop")
        position = len(c.request.prompt) + c.generated - 1  # where this token goes when decoded
        if c.generated >= params.max_tokens or position >= self.max_seq_len:
            more, stopped = c.stops.feed(c.text.finish())
            self._show(c, text + more + ("" if stopped else c.stops.flush()), [token], final=True, cut=stopped)
            return self._finish(c, "stop" if stopped else "length")
        self._show(c, text, [token])
        c.pending, c.position = token, position

    def _show(self, c: _Choice, text: str, tokens: List[int], final: bool = False, cut: bool = False) -> None:
        """Hand text to the sink with the log-prob entries of the tokens whose text starts in what is shown by
        now (a token whose text the stop strings still hold back keeps its entry back too). At the end the rest
        go as well, unless a stop string cut the text: entries past the cut are dropped."""
        c.shown += len(text)
        ready = [e for e in c.entries if e.offset < c.shown or (final and not cut)]
        c.entries = [] if final else c.entries[len(ready):]
        if text or ready or tokens:
            self._emit(c, Chunk(text, ready, tokens, index=c.index))

    def _token_logprob(self, logprobs: torch.Tensor, token: int, k: int, offset: int) -> TokenLogprob:
        text, raw = token_text(self.tokenizer, token)
        top = []
        if k:
            values, ids = torch.topk(logprobs, k)
            top = top_entries(self.tokenizer, values.tolist(), ids.tolist())
        return TokenLogprob(text, raw, float(logprobs[token]), top, offset)

    # --- ends ----------------------------------------------------------------------------------------------

    def _free_cancelled(self) -> None:
        for c in list(self._rows.values()):
            if c.request.cancelled and not c.done:
                self._finish_cancelled(c)

    def _finish_cancelled(self, c: _Choice) -> None:
        """A cancelled choice ends as 'cancelled', or as 'abort' (with its message) when its server aborted it."""
        if c.request.aborted:
            self._finish(c, "abort", c.request.aborted)
        else:
            self._finish(c, "cancelled")

    def _finish(self, c: _Choice, reason: str, message: str = "") -> None:
        """A choice's last event; its row is free from now on. completion_tokens counts the answer's tokens
        (a final stop token is not one)."""
        if c.done:
            return
        c.done = True
        if self._rows.get(c.row) is c:
            del self._rows[c.row]
            if self.prefix_cache is not None and reason in ("stop", "length") and c.prefilled:
                # the row holds the KV of the prompt and of every sampled token but the last (never decoded)
                held = len(c.request.prompt) + c.generated - 1
                self._saves.append((c.row, (list(c.request.prompt) + c.text.tokens)[:held]))
        for sibling in [s for s in self._rows.values() if s.parent is c and not s.prefilled]:
            self._finish(sibling, reason, message)  # a choice whose prefill never ran cannot go on either
        self._emit(c, Finished(reason, len(c.request.prompt), len(c.text.tokens), message, index=c.index))

    def _step_failed(self, err: Exception, admitted: List[_Choice]) -> None:
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
        self._probe = True
        for c in admitted:
            for member in [c] + [s for s in list(self._rows.values()) if s.parent is c]:
                self._finish(member, "error", f"the prompt's prefill failed: {type(err).__name__}: {err}")

    def fail(self, message: str) -> None:
        """End every request with an 'error' event: the engine cannot serve (a model call failed)."""
        self.failure = message
        for c in list(self._rows.values()):
            self._finish(c, "error", message)
        self._to_prefill.clear()

    def _guarded(self, c: _Choice, work):
        """Run one choice's work; whatever it raises ends that request alone (all its choices), with an error
        event naming what went wrong, and the other requests go on."""
        try:
            return work()
        except Exception as err:
            log.exception("request %s failed; ending it alone", c.request.id)
            c.request.cancelled = True
            for other in [o for o in list(self._rows.values()) if o.request is c.request] + [c]:
                if not other.done:
                    self._finish(other, "error", f"{type(err).__name__}: {err}")
            return None

    def _emit(self, c: _Choice, event: Event) -> None:
        try:
            c.request.sink(event)
        except Exception:  # a broken sink ends its own request, never the others
            log.exception("request %s: its event sink failed; cancelling it", c.request.id)
            c.request.cancelled = True
