"""The server's scheduler: requests, their queue and the engine thread; the rows are the engine's.

Concurrent requests share one engine (llama/engine). At each step boundary the scheduler
  1. drops cancelled waiting requests (the engine frees the rows of cancelled running ones),
  2. admits waiting requests, first come first served, while the engine has free rows for all their choices and
     free KV blocks for their prompts (and no preempted choice waits to resume: those go first); a request
     waiting for a LoRA adapter's slot lets those behind it go (admission.next_admissible),
  3. runs one engine step: decode for every running row, packed prefill of the admitted prompts (at most
     max_prefill_tokens tokens in one step), sampling, stops and events.
Requests beyond the free rows wait in a bounded queue: `submit` raises QueueFull when it is full.

It is pure Python, no HTTP: one thread (the engine thread, `start`) calls `step`; any thread may `submit` and
`cancel`. Each request's events go to its `sink`, called on the engine thread: a sink must return at once (the
server hands them to its event loop).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

from ..engine import Engine as RowEngine, Runner
from ..engine.admission import next_admissible
from ..engine.events import Event, Finished, Request
from ..engine.params import SamplingParams
from ..generation import Llama

log = logging.getLogger("llama.serve")


class QueueFull(Exception):
    """Every row is busy and the waiting queue is full: try again later."""


class Unavailable(Exception):
    """The engine is draining (shutting down) or stopped after a failure: it takes no new requests."""


def kv_storage(model) -> str:
    """How the model's KV pool stores keys and values, for /health: "int8" or the model's dtype."""
    return getattr(model, "kv_dtype", None) or str(model.norm.weight.dtype).removeprefix("torch.")


class Scheduler:
    """Requests in, events out, over a generator's model and KV cache; see the module docstring."""

    def __init__(self, generator: Llama, max_queue: int = 64, seed: int = 0, runner: Optional[Runner] = None,
                 fixed_shape: Optional[bool] = None, max_prefill_tokens: Optional[int] = None) -> None:
        """fixed_shape: decode all max_batch_size rows every step (True), or only rows 0..the highest busy one
        (False). None: fixed when the decode step is compiled or the generator is deterministic."""
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.generator = generator
        self.engine = RowEngine(generator.decode_step, generator.tokenizer, generator.stop_ids,
                             runner=runner if runner is not None else Runner(generator.decode_step),
                             deterministic=generator.deterministic, max_prefill_tokens=max_prefill_tokens,
                             seed=seed, fixed_shape=fixed_shape, speculation=getattr(generator, "speculation", None),
                             prefix_cache=getattr(generator, "prefix_cache", None))
        self.tokenizer = generator.tokenizer
        self.max_batch_size = generator.max_batch_size
        self.max_seq_len = generator.max_seq_len
        self.vocab_size = generator.model.params.vocab_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self._cond = threading.Condition()
        self._waiting: Deque[Request] = deque()
        self._admitted: Set[Request] = set()  # in the engine, not yet finished
        self._ending = 0  # requests taken off the queue whose last event is still being handed out
        self._reported = False  # the engine's failure was handed on (on_failure)
        self._running = 0  # the engine's busy rows, readable under the lock from any thread
        self._preempted = 0  # the engine's preempted choices waiting to resume
        self._blocks = (0, 0, 0)  # KV blocks in use, in all, preemptions so far
        self._draining = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "abort": 0, "error": 0}  # requests ended, by reason
        self.on_failure: Optional[Callable[[str], None]] = None  # called (engine thread) once the engine fails

    @property
    def failure(self) -> Optional[str]:
        """Why the engine stopped (a model call failed), or None while it can serve."""
        return self.engine.failure

    @property
    def runner(self) -> Runner:
        """Runs each step's model calls (shared with the other ranks when there are any)."""
        return self.engine.runner

    @runner.setter
    def runner(self, runner: Runner) -> None:
        self.engine.runner = runner

    @property
    def steps(self) -> int:
        return self.engine.steps

    # --- any thread ----------------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """ValueError unless the request can run (see Engine.check)."""
        self.engine.check(prompt, params)

    def exclusive(self, work):
        """Run work() while no request is admitted (changes to what the engine serves: LoRA adapters)."""
        with self._cond:
            return work()

    def submit(self, request: Request) -> None:
        """Queue a request: it starts at the next step boundary with free rows. Raises ValueError (bad
        request), QueueFull, or Unavailable (draining or stopped)."""
        self.check(request.prompt, request.params)
        self.engine.check_lora(request.lora)
        with self._cond:
            if self._draining or self._stopping or self.failure is not None:
                raise Unavailable(self.failure or "the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch_size - self._running):
                raise QueueFull(f"all {self.max_batch_size} rows are busy and {len(self._waiting)} requests wait")
            request.sink = self._tracking(request, request.sink)
            self._waiting.append(request)
            self._cond.notify_all()

    def _tracking(self, request: Request, sink):
        """The request's sink, which also counts its end by reason (for /health) and forgets it once every
        choice has finished."""
        left = [request.params.n]

        def tracked(event: Event) -> None:
            if isinstance(event, Finished):
                left[0] -= 1
                if left[0] == 0:
                    self.finished[event.reason] = self.finished.get(event.reason, 0) + 1
                    with self._cond:
                        self._admitted.discard(request)
            sink(event)
        return tracked

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its rows are freed at the next step boundary, and it gets a
        Finished('cancelled') event unless it had finished already."""
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    def stats(self) -> Dict[str, Union[int, str]]:
        with self._cond:
            in_use, total, preemptions = self._blocks
            return {"running": self._running, "waiting": len(self._waiting) + self._preempted,
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue, "kv_blocks_in_use": in_use,
                    "kv_blocks_total": total, "kv_dtype": kv_storage(self.engine.model), "preemptions": preemptions}

    def prefix_cache_stats(self) -> Optional[Dict[str, int]]:
        """The prefix cache's counters (tokens queried and hit, blocks in use and in all), None when it is off."""
        cache = self.engine.prefix_cache
        return None if cache is None else cache.stats()

    def cancelling(self) -> int:
        """Running requests that were cancelled and whose rows the next step boundary frees."""
        with self._cond:
            return sum(r.cancelled for r in self._admitted)

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Take no new requests; those running or waiting go on to the end."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def abort(self, message: str) -> int:
        """End every running and waiting request at the next step boundary with Finished('abort', message) (a
        drain that ran out of time). Returns how many there were."""
        with self._cond:
            victims = [r for r in list(self._waiting) + list(self._admitted) if not r.cancelled]
            for request in victims:
                request.aborted = message
                request.cancelled = True
            self._cond.notify_all()
        return len(victims)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until no request is admitted (in a step under way too), runs or waits (True), or the timeout passes."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._running or self._preempted or self._waiting or self._ending
                                                    or (self._admitted and self.failure is None)), timeout)

    def wait_until_running(self, n: int, timeout: Optional[float] = None) -> bool:
        """Block until at least n rows are busy (True), or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running >= n, timeout)

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
                for request in list(self._waiting) + list(self._admitted):
                    request.cancelled = True
            self._cond.notify_all()
        if self._thread is None:
            self.engine.runner.close()
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
            self.engine.fail(f"the engine failed: {type(err).__name__}: {err}")
            self._failed()
        finally:
            self.engine.runner.close()

    def _has_work(self) -> bool:
        return bool(self._running or self._preempted or self._waiting)

    def step(self) -> bool:
        """One step boundary (see the module docstring). False when there was nothing to do."""
        ended: List[Tuple[Request, Finished]] = []
        with self._cond:
            keep: Deque[Request] = deque()
            for q in self._waiting:
                if q.cancelled:
                    ended.append((q, Finished("abort", len(q.prompt), 0, q.aborted) if q.aborted else
                                  Finished("cancelled", len(q.prompt), 0)))
                else:
                    keep.append(q)
            self._waiting = keep
            while (request := next_admissible(self.engine, self._waiting)) is not None:
                self._waiting.remove(request)
                try:
                    self.engine.add(request)
                    self._admitted.add(request)
                except Exception as err:  # checked at submit, so not expected: it must not stop the others
                    log.exception("request %s could not be admitted", request.id)
                    ended.append((request, Finished("error", len(request.prompt), 0, f"{type(err).__name__}: {err}")))
            self._ending += len(ended)  # idle only once their last events are out
        for request, event in ended:
            for index in range(request.params.n):
                self._safe_sink(request, Finished(event.reason, event.prompt_tokens, 0, event.message, index=index))
        worked = self.engine.step()
        with self._cond:
            self._running, self._preempted = self.engine.running, self.engine.waiting
            pool = self.engine.pool
            self._blocks = (pool.in_use, pool.usable, self.engine.preemptions)
            self._ending -= len(ended)
            self._cond.notify_all()
        if self.failure is not None and not self._reported:
            self._failed()
        return worked or bool(ended)

    def _failed(self) -> None:
        """The engine cannot serve: end the waiting requests too, and tell the server (on_failure)."""
        self._reported = True
        with self._cond:
            victims = list(self._waiting)
            self._waiting.clear()
            self._running = self._preempted = 0
            self._cond.notify_all()
        for request in victims:
            for index in range(request.params.n):
                self._safe_sink(request, Finished("error", len(request.prompt), 0, self.failure or "the engine failed",
                                                  index=index))
        if self.on_failure is not None:
            try:
                self.on_failure(self.failure or "the engine failed")
            except Exception:
                log.exception("the scheduler's on_failure callback failed")

    @staticmethod
    def _safe_sink(request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:
            log.exception("request %s: its event sink failed", request.id)


Engine = Scheduler  # llama.serve.Engine, this class's public name before the row engine moved to llama/engine
