"""The continuous-batching engine: concurrent requests share one decode loop over the KV cache's rows.

At each step boundary the engine
  1. frees the rows of cancelled requests (a client that went away) and drops cancelled waiting ones,
  2. admits waiting requests (first come, first served) into free rows, all of them in ONE packed prefill
     (at most max_prefill_tokens prompt tokens in all, when set, so one step's prefill stays bounded; the
     first waiting request is always admitted),
  3. runs one decode step for all max_batch_size rows (an idle row decodes a dummy token at position 0 of its
     own row, which no request reads), so the step's shape never changes (compiled steps, CUDA graphs); an
     eager step (CPUs) runs rows 0..the highest busy row only, as idle rows there cost full price,
  4. samples each active row's next token with that request's own temperature, top_p and generator,
     turns tokens into text (whole characters only), cuts at stop strings, and frees a finished row at once.
Requests beyond the free rows wait in a bounded queue: `submit` raises QueueFull when it is full.

Failure isolation: whatever goes wrong while serving one request (admitting it, its prefill, sampling its
token, turning it into text, its sink) ends that request alone with Finished('error') and frees its row; the
others go on. The per-request guards are the small `_guarded_*` methods below. Only a decode step that fails
with no admission in it (the model cannot serve the running rows) or a bug in the loop itself stops the engine
(`failure` is set, every request ends with an error, `on_failure` is called).

The scheduler knows requests; the model only sees rows and positions. It is pure Python, no HTTP: one thread
(the engine thread, `start`) calls `step`; any thread may `submit` and `cancel`. Each request's events go to
its `sink`, called on the engine thread: a sink must return at once (the server hands them to its event loop).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..generation import Llama
from ..sampling import GREEDY_BELOW, check_sampling_args, next_tokens
from ..tokenizer import TextStream, Tokenizer
from .runner import StepPlan, StepRunner
from .stop import StopText

log = logging.getLogger("llama.serve")

MAX_LOGPROBS = 20  # most alternatives a request may ask for at each position
MAX_SEED = 2 ** 64 - 1  # seeds are 64-bit unsigned integers (torch.Generator.manual_seed's range)
MAX_FAILED_STEPS = 3  # failing model calls in a row that stop the engine, whatever they held


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None  # None: drawn from the engine's own seed sequence
    stop: Sequence[str] = ()
    logprobs: Optional[int] = None  # None: none; k: each token's log-prob and the k most likely alternatives


@dataclass
class TokenLogprob:
    """One generated token as text (`bytes:\\xNN` for a lone byte-fallback token), its log-prob, the top-k, and
    where its text starts in the answer's text (characters; a byte of a split character: where that starts)."""

    token: str
    bytes: List[int]
    logprob: float
    top: List[Tuple[str, List[int], float]]
    offset: int = 0


@dataclass
class Chunk:
    """New text of a request (whole characters; may be "" when only log-probs are new)."""

    text: str
    logprobs: List[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    """The request's last event. reason: 'stop' (EOS or a stop string), 'length' (max_tokens or the context),
    'cancelled', 'abort' (ended by the server: its drain timed out; message says so) or 'error' (message says
    why)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    message: str = ""


Event = Union[Chunk, Finished]


@dataclass(eq=False)
class Request:
    prompt: List[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False
    # True: the answer's text continues the prompt's (prompt text + answer = decode(prompt + answer tokens), its
    # first token's word-boundary space kept), as completions want. False: the answer's tokens decoded alone
    # (the first space dropped), as Llama.chat_completion and the chat endpoint give.
    continues_prompt: bool = False
    aborted: Optional[str] = None  # set by `abort`: the request ends with Finished('abort', message=...)


class QueueFull(Exception):
    """Every row is busy and the waiting queue is full: try again later."""


class Unavailable(Exception):
    """The engine is draining (shutting down) or stopped after a failure: it takes no new requests."""


@dataclass(eq=False)
class _Running:
    """A request that holds a cache row."""

    request: Request
    row: int
    generator: Optional[torch.Generator]
    text: TextStream
    stops: StopText
    position: int = 0  # where `pending` goes in the row
    pending: int = 0  # the last sampled token, decoded at the next step
    generated: int = 0  # tokens sampled so far (an EOS included)
    shown: int = 0  # characters of text handed to the sink (what the stop strings let through)
    entries: List[TokenLogprob] = field(default_factory=list)  # log-probs whose text is not shown yet


class Engine:
    """Owns a Llama's model and KV cache while it runs; see the module docstring."""

    def __init__(self, generator: Llama, max_queue: int = 64, seed: int = 0,
                 runner: Optional[StepRunner] = None, fixed_shape: Optional[bool] = None,
                 max_prefill_tokens: Optional[int] = None) -> None:
        """fixed_shape: decode all max_batch_size rows every step (True), or only rows 0..the highest busy one
        (False). None: fixed when the decode step is compiled (CUDA graphs replay one shape), else not (on an
        eager CPU step every idle row costs as much as a busy one)."""
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int)
                                               or isinstance(max_prefill_tokens, bool) or max_prefill_tokens < 1):
            raise ValueError(f"max_prefill_tokens must be a positive integer or None, got {max_prefill_tokens!r}")
        self.max_prefill_tokens = max_prefill_tokens
        self.generator = generator
        self.fixed_shape = fixed_shape
        self.tokenizer: Tokenizer = generator.tokenizer
        self.max_batch_size = generator.max_batch_size
        self.max_seq_len = generator.max_seq_len
        self.vocab_size = generator.model.params.vocab_size
        self.max_queue = max_queue
        self.runner = runner if runner is not None else StepRunner(generator)
        self._seeds = random.Random(seed)
        self._cond = threading.Condition()
        self._waiting: Deque[Request] = deque()
        self._rows: Dict[int, _Running] = {}  # by row; changed by the engine thread, under the lock
        self._n_running = 0  # len(_rows), readable under the lock from any thread
        self._draining = False
        self._stopping = False
        self.failure: Optional[str] = None  # set when the engine cannot serve any more: it stopped
        self.on_failure: Optional[Callable[[str], None]] = None  # called (engine thread) when failure is set
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # steps run (tests and the benchmark read it)
        self._failed_steps = 0  # consecutive steps whose model call failed
        self._probe = False  # after a failed step with admissions: the next step decodes only (see _step_failed)
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "abort": 0, "error": 0}  # requests ended, by reason

    # --- any thread ----------------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """ValueError unless the request can run: token ids in the vocabulary, and room in the context."""
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("the prompt must be a non-empty list of token ids")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"the prompt has token ids outside 0..{self.vocab_size - 1}")
        check_sampling_args(params.temperature, params.top_p)
        n = params.max_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {n!r}")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context (max_seq_len) holds "
                             f"{self.max_seq_len} with the answer, so prompts may have up to {self.max_seq_len - 1}")
        if len(prompt) + n > self.max_seq_len:
            raise ValueError(f"the prompt's {len(prompt)} tokens plus max_tokens {n} exceed the context "
                             f"(max_seq_len {self.max_seq_len}): ask for at most {self.max_seq_len - len(prompt)}")
        if params.logprobs is not None and not (isinstance(params.logprobs, int) and
                                                0 <= params.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {params.logprobs!r}")
        seed = params.seed
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED} (64 bits), got {seed!r}")
        if not all(isinstance(s, str) for s in params.stop):
            raise ValueError("stop must be a list of strings")

    def submit(self, request: Request) -> None:
        """Queue a request: it starts at the next step boundary with a free row. Raises ValueError (bad
        request), QueueFull, or Unavailable (draining or stopped)."""
        self.check(request.prompt, request.params)
        with self._cond:
            if self._draining or self._stopping or self.failure is not None:
                raise Unavailable(self.failure or "the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch_size - self._n_running):
                raise QueueFull(f"all {self.max_batch_size} rows are busy and {len(self._waiting)} requests wait")
            self._waiting.append(request)
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its row is freed at the next step boundary, and it gets a
        Finished('cancelled') event unless it had finished already."""
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    def stats(self) -> Dict[str, int]:
        with self._cond:
            return {"running": self._n_running, "waiting": len(self._waiting), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue}

    def cancelling(self) -> int:
        """Running requests that were cancelled and whose rows the next step boundary frees."""
        with self._cond:
            return sum(r.request.cancelled for r in list(self._rows.values()))

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Take no new requests; those running or waiting go on to the end."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def abort(self, message: str) -> int:
        """End every running and waiting request at the next step boundary with Finished('abort', message)
        (a drain that ran out of time). Returns how many there were."""
        with self._cond:
            victims = list(self._waiting) + [r.request for r in self._rows.values()]
            for request in victims:
                if not request.cancelled:
                    request.aborted = message
                    request.cancelled = True
            self._cond.notify_all()
        return len(victims)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until no request runs or waits (True), or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._n_running and not self._waiting, timeout)

    def wait_until_running(self, n: int, timeout: Optional[float] = None) -> bool:
        """Block until at least n requests hold rows (True), or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._n_running >= n, timeout)

    # --- the engine thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="llama-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None, cancel: bool = False) -> bool:
        """Drain (or, with cancel, cancel everything), let the loop finish and end the engine thread; the
        other ranks leave `follow`. True when the thread has ended."""
        with self._cond:
            self._draining = self._stopping = True
            if cancel:
                for request in list(self._waiting) + [r.request for r in self._rows.values()]:
                    request.cancelled = True
            self._cond.notify_all()
        if self._thread is None:
            self.runner.close()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def run(self) -> None:
        """The engine loop: step while there is work, sleep on the condition while there is none."""
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._has_work() or self._stopping)
                    if not self._has_work():
                        return
                self.step()
                if self.failure is not None:
                    return
        except Exception as err:  # a bug in the loop itself: no request can be served any more
            log.exception("the engine loop failed; stopping the engine")
            self._fail(f"the engine failed: {type(err).__name__}: {err}")
        finally:
            self.runner.close()

    def _has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    def step(self) -> bool:
        """One step boundary (see the module docstring). False when there was nothing to do."""
        admitted = self._boundary()
        if not self._rows:
            return False
        self.steps += 1
        running = [r for r in self._rows.values() if r not in admitted]
        plan = StepPlan()
        if running:
            fixed = self.generator.decode_step.compiled if self.fixed_shape is None else self.fixed_shape
            width = self.max_batch_size if fixed else 1 + max(r.row for r in running)
            plan.decode_tokens, plan.decode_positions = [0] * width, [0] * width
            for r in running:
                plan.decode_tokens[r.row], plan.decode_positions[r.row] = r.pending, r.position
        plan.prefill_prompts = [r.request.prompt for r in admitted]
        plan.prefill_rows = [r.row for r in admitted]
        try:
            decoded, prefilled = self.runner.run(plan)
        except Exception as err:
            self._step_failed(err, admitted)
            return True
        self._failed_steps, self._probe = 0, False
        order = running + admitted
        rows = []
        if running:
            rows.append(decoded[torch.tensor([r.row for r in running], device=decoded.device)])
        if admitted:
            rows.append(prefilled)
        self._advance(order, torch.cat(rows) if len(rows) > 1 else rows[0])
        return True

    def _step_failed(self, err: Exception, admitted: List[_Running]) -> None:
        """A model call failed. With admissions in the step, the prefill is the suspect: those requests end with
        an error and free their rows, and the next step admits nobody, so that its decode alone tells a bad
        prompt from a broken model. The running rows decode the same token at the same position again (the
        same cache entries rewritten), so they lose nothing. A failing step without admissions, or
        MAX_FAILED_STEPS failing steps in a row, mean the model cannot serve: the engine stops."""
        self._failed_steps += 1
        if not admitted or self._failed_steps >= MAX_FAILED_STEPS:
            log.exception("the model call failed; stopping the engine")
            self._fail(f"the model failed: {type(err).__name__}: {err}")
            return
        log.exception("a step with %d admitted request(s) failed; ending those requests", len(admitted))
        self._probe = True
        self._end_rows([(r, "error", f"the prompt's prefill failed: {type(err).__name__}: {err}")
                        for r in admitted])

    def _boundary(self) -> List[_Running]:
        """Free cancelled rows, drop cancelled waiting requests, admit waiting ones into free rows."""
        dropped: List[Tuple[Request, Optional[_Running]]] = []
        admitted: List[_Running] = []
        with self._cond:
            for row, r in list(self._rows.items()):
                if r.request.cancelled:
                    del self._rows[row]
                    dropped.append((r.request, r))
            keep = [q for q in self._waiting if not q.cancelled]
            dropped += [(q, None) for q in self._waiting if q.cancelled]
            self._waiting = deque(keep)
            free = [row for row in range(self.max_batch_size) if row not in self._rows]
            budget = self.max_prefill_tokens
            refused: List[Tuple[Request, str]] = []
            while free and self._waiting and not (self._probe and self._rows):
                if budget is not None and admitted and len(self._waiting[0].prompt) > budget:
                    break  # this step's prefill is full: the rest wait for the next boundary
                request = self._waiting.popleft()
                r = self._guarded_start(request, free[0])
                if isinstance(r, str):
                    refused.append((request, r))
                    continue
                if budget is not None:
                    budget -= len(request.prompt)
                free.pop(0)
                self._rows[r.row] = r
                admitted.append(r)
            self._n_running = len(self._rows)
            self._cond.notify_all()
        for request, r in dropped:
            self._finish(request, "abort" if request.aborted else "cancelled", r, request.aborted or "")
        for request, message in refused:
            self._finish(request, "error", None, message)
        return admitted

    def _guarded_start(self, request: Request, row: int) -> Union[_Running, str]:
        """The request's row state, or (when making it fails) the error message that ends the request."""
        try:
            return self._start(request, row)
        except Exception as err:
            log.exception("request %s: admission failed", request.id)
            return f"the request could not be admitted: {type(err).__name__}: {err}"

    def _start(self, request: Request, row: int) -> _Running:
        seed = request.params.seed if request.params.seed is not None else self._seeds.getrandbits(63)
        gen = None
        if request.params.temperature >= GREEDY_BELOW:
            gen = torch.Generator(device=self.generator.device).manual_seed(seed)
        context = request.prompt if request.continues_prompt else ()
        return _Running(request, row, gen, TextStream(self.tokenizer, context), StopText(request.params.stop),
                        position=len(request.prompt))

    def _advance(self, order: List[_Running], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits (rows of `logits` in `order`), emit, finish rows."""
        tokens = self._guarded_sample(order, logits)
        wanted = [i for i, r in enumerate(order) if r.request.params.logprobs is not None and tokens[i] is not None]
        lps = None
        if wanted:
            lps = F.log_softmax(logits[torch.tensor(wanted, device=logits.device)].float(), dim=-1)
        where = {i: j for j, i in enumerate(wanted)}
        ended: List[Tuple[_Running, str, str]] = []
        for i, (r, token) in enumerate(zip(order, tokens)):
            if token is None:
                ended.append((r, "error", "sampling the next token failed"))
                continue
            row_lps = lps[where[i]] if i in where else None
            outcome = self._guarded_row(r, token, row_lps)
            if outcome is not None:
                ended.append((r, *outcome))
        if ended:
            self._end_rows(ended)

    def _guarded_sample(self, order: List[_Running], logits: torch.Tensor) -> List[Optional[int]]:
        """Each row's next token, all rows at once; if that fails, row by row, so that only the rows whose own
        sampling fails get None (their requests end with an error)."""
        params = [r.request.params for r in order]
        try:
            return next_tokens(logits, [p.temperature for p in params], [p.top_p for p in params],
                               [r.generator for r in order]).tolist()
        except Exception:
            log.exception("sampling a batch failed; sampling its rows one by one")
        tokens: List[Optional[int]] = []
        for i, (r, p) in enumerate(zip(order, params)):
            try:
                tokens.append(int(next_tokens(logits[i:i + 1], [p.temperature], [p.top_p], [r.generator])[0]))
            except Exception:
                log.exception("request %s: sampling failed", r.request.id)
                tokens.append(None)
        return tokens

    def _guarded_row(self, r: _Running, token: int, lps: Optional[torch.Tensor]) -> Optional[Tuple[str, str]]:
        """Take a row's sampled token: its log-probs, text, stop strings, events. None while the request goes
        on, else (reason, message) to end it with; an exception here ends this request alone."""
        try:
            return self._take(r, token, lps)
        except Exception as err:
            log.exception("request %s: handling its token failed", r.request.id)
            return "error", f"turning the answer into text failed: {type(err).__name__}: {err}"

    def _take(self, r: _Running, token: int, lps: Optional[torch.Tensor]) -> Optional[Tuple[str, str]]:
        r.generated += 1
        if r.request.cancelled:
            return ("abort", r.request.aborted) if r.request.aborted else ("cancelled", "")
        if token == self.tokenizer.eos_id:  # the end: no log-prob entry (</s> is not part of the answer)
            self._show(r, r.stops.feed(r.text.finish())[0] + r.stops.flush(), final=True)
            return "stop", ""
        if lps is not None:
            r.entries.append(self._token_logprob(lps, token, r.request.params.logprobs, r.text.offset))
        text, stopped = r.stops.feed(r.text.push(token))
        if stopped:
            self._show(r, text, final=True, cut=True)
            return "stop", ""
        position = len(r.request.prompt) + r.generated - 1  # where this token goes when decoded
        if r.generated >= r.request.params.max_tokens or position >= self.max_seq_len:
            text2, stopped = r.stops.feed(r.text.finish())
            self._show(r, text + text2 + ("" if stopped else r.stops.flush()), final=True, cut=stopped)
            return ("stop" if stopped else "length"), ""
        self._show(r, text)
        r.pending, r.position = token, position
        return None

    def _show(self, r: _Running, text: str, final: bool = False, cut: bool = False) -> None:
        """Hand text to the sink with the log-prob entries of the tokens whose text starts in what is shown by
        now (a token's text still held back by the stop strings keeps its entry back too). At the end the rest
        go as well, unless a stop string cut the text: entries past the cut are dropped."""
        r.shown += len(text)
        ready = [e for e in r.entries if e.offset < r.shown or (final and not cut)]
        r.entries = [] if final else r.entries[len(ready):]
        if text or ready:
            self._emit(r.request, Chunk(text, ready))

    def _end_rows(self, ended: List[Tuple[_Running, str, str]]) -> None:
        """Free the rows of requests that ended, then send each its last event."""
        with self._cond:
            for r, _, _ in ended:
                self._rows.pop(r.row, None)
            self._n_running = len(self._rows)
            self._cond.notify_all()
        for r, reason, message in ended:
            self._finish(r.request, reason, r, message)

    def _finish(self, request: Request, reason: str, r: Optional[_Running] = None, message: str = "") -> None:
        """The last event; completion_tokens counts the answer's tokens (a final EOS is not one)."""
        self.finished[reason] += 1
        self._emit(request, Finished(reason, len(request.prompt), len(r.text.tokens) if r is not None else 0,
                                     message))

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:  # a broken sink must not stop the other requests
            log.exception("request %s: its event sink failed; cancelling it", request.id)
            request.cancelled = True

    def _fail(self, message: str) -> None:
        with self._cond:
            self.failure = message
            victims = [r.request for r in self._rows.values()] + list(self._waiting)
            self._rows.clear()
            self._waiting.clear()
            self._n_running = 0
            self._cond.notify_all()
        for request in victims:
            self.finished["error"] += 1
            self._emit(request, Finished("error", len(request.prompt), 0, message))
        if self.on_failure is not None:
            try:
                self.on_failure(message)
            except Exception:
                log.exception("the engine's on_failure callback failed")

    def _token_logprob(self, logprobs: torch.Tensor, token: int, k: int, offset: int) -> TokenLogprob:
        text, raw = token_text(self.tokenizer, token)
        top: List[Tuple[str, List[int], float]] = []
        if k:
            values, ids = torch.topk(logprobs, k)
            top = [(*token_text(self.tokenizer, t), v) for t, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(text, raw, float(logprobs[token]), top, offset)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer: Tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token as OpenAI's log-prob entries show it: its text (word-boundary '▁' as a space; a byte-fallback
    token of a non-ASCII byte as `bytes:\\xNN`) and its UTF-8 bytes."""
    piece = tokenizer.id_to_piece(token)
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        value = int(match.group(1), 16)
        return (chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"), [value]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))
