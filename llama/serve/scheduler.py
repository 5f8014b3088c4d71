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

The scheduler knows requests; the model only sees rows and positions. It is pure Python, no HTTP: one thread
(the engine thread, `start`) calls `step`; any thread may `submit` and `cancel`. Each request's events go to
its `sink`, called on the engine thread: a sink must return at once (the server hands them to its event loop).
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..generation import Llama
from ..sampling import check_sampling_args, next_tokens
from ..tokenizer import TextStream, Tokenizer
from .runner import StepPlan, StepRunner
from .stop import StopText

log = logging.getLogger("llama.serve")

MAX_LOGPROBS = 20  # most alternatives a request may ask for at each position


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
    """One generated token as text (`bytes:\\xNN` for a lone byte-fallback token), its log-prob, the top-k."""

    token: str
    bytes: List[int]
    logprob: float
    top: List[Tuple[str, List[int], float]]


@dataclass
class Chunk:
    """New text of a request (whole characters; may be "" when only log-probs are new)."""

    text: str
    logprobs: List[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    """The request's last event. reason: 'stop' (EOS or a stop string), 'length' (max_tokens or the context),
    'cancelled', or 'error' (message says why)."""

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
        self.failure: Optional[str] = None  # set when a step failed: the engine stopped
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # steps run (tests and the benchmark read it)
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}  # requests ended, by reason

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
            order = running + admitted
            rows = []
            if running:
                rows.append(decoded[torch.tensor([r.row for r in running], device=decoded.device)])
            if admitted:
                rows.append(prefilled)
            self._advance(order, torch.cat(rows) if len(rows) > 1 else rows[0])
        except Exception as err:  # a failing model call leaves the cache in doubt: fail everything, stop
            log.exception("the engine step failed; stopping the engine")
            self._fail(f"the model failed: {type(err).__name__}: {err}")
        return True

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
            while free and self._waiting:
                if budget is not None and admitted and len(self._waiting[0].prompt) > budget:
                    break  # this step's prefill is full: the rest wait for the next boundary
                request = self._waiting.popleft()
                if budget is not None:
                    budget -= len(request.prompt)
                r = self._start(request, free.pop(0))
                self._rows[r.row] = r
                admitted.append(r)
            self._n_running = len(self._rows)
            self._cond.notify_all()
        for request, r in dropped:
            self._finish(request, "cancelled", r)
        return admitted

    def _start(self, request: Request, row: int) -> _Running:
        seed = request.params.seed if request.params.seed is not None else self._seeds.getrandbits(63)
        gen = None
        if request.params.temperature > 0:
            gen = torch.Generator(device=self.generator.device).manual_seed(seed)
        return _Running(request, row, gen, TextStream(self.tokenizer), StopText(request.params.stop),
                        position=len(request.prompt))

    def _advance(self, order: List[_Running], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits (rows of `logits` in `order`), emit, finish rows."""
        params = [r.request.params for r in order]
        tokens = next_tokens(logits, [p.temperature for p in params], [p.top_p for p in params],
                             [r.generator for r in order]).tolist()
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        infos: Dict[int, TokenLogprob] = {}
        if wanted:
            lps = F.log_softmax(logits[torch.tensor(wanted, device=logits.device)], dim=-1)
            for j, i in enumerate(wanted):
                infos[i] = self._token_logprob(lps[j], tokens[i], params[i].logprobs)
        stop_ids = self.generator.stop_ids  # family seam: the family's stop tokens (Llama 3: <|eot_id|>...)
        finished: List[Tuple[_Running, str]] = []
        for i, (r, token) in enumerate(zip(order, tokens)):
            r.generated += 1
            if r.request.cancelled:
                finished.append((r, "cancelled"))
                continue
            if token in stop_ids:
                self._emit_text(r, r.stops.feed(r.text.finish())[0] + r.stops.flush(), infos.get(i))
                finished.append((r, "stop"))
                continue
            text, stopped = r.stops.feed(r.text.push(token))
            if stopped:
                self._emit_text(r, text, infos.get(i))
                finished.append((r, "stop"))
                continue
            position = len(r.request.prompt) + r.generated - 1  # where this token goes when decoded
            if r.generated >= r.request.params.max_tokens or position >= self.max_seq_len:
                text2, stopped = r.stops.feed(r.text.finish())
                self._emit_text(r, text + text2 + ("" if stopped else r.stops.flush()), infos.get(i))
                finished.append((r, "stop" if stopped else "length"))
                continue
            self._emit_text(r, text, infos.get(i))
            r.pending, r.position = token, position
        if finished:
            with self._cond:
                for r, _ in finished:
                    self._rows.pop(r.row, None)
                self._n_running = len(self._rows)
                self._cond.notify_all()
            for r, reason in finished:
                self._finish(r.request, reason, r)

    def _finish(self, request: Request, reason: str, r: Optional[_Running] = None) -> None:
        """The last event; completion_tokens counts the answer's tokens (a final EOS is not one)."""
        self.finished[reason] += 1
        self._emit(request, Finished(reason, len(request.prompt), len(r.text.tokens) if r is not None else 0))

    def _emit_text(self, r: _Running, text: str, info: Optional[TokenLogprob]) -> None:
        if text or info is not None:
            self._emit(r.request, Chunk(text, [info] if info is not None else []))

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

    def _token_logprob(self, logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
        text, raw = token_text(self.tokenizer, token)
        top: List[Tuple[str, List[int], float]] = []
        if k:
            values, ids = torch.topk(logprobs, k)
            top = [(*token_text(self.tokenizer, t), v) for t, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(text, raw, float(logprobs[token]), top)


def token_text(tokenizer: Tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token as OpenAI's log-prob entries show it: its text (SentencePiece's word-boundary '▁' as a space) and
    its UTF-8 bytes; a token that is not whole UTF-8 (a byte-fallback or byte-level piece) as `bytes:\\xNN...`.
    Family seam: tokenizer.token_bytes serves SentencePiece and tiktoken alike."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)
