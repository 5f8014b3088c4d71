"""TokenGenerator: a model, its tokenizer and the engine over them; token prompts in, tokens out, in batches or
streamed. `Llama` (llama/generation.py) builds on it with text, chat, infilling and moderation.

Every call runs through the generator's `Engine` (llama/engine): prompts are added as requests, the engine
prefills them in one packed pass and decodes all rows together, each at its own position, until every request
has finished. `generate` collects the events; the streaming methods hand text on as it comes. Every process of
a torchrun group runs the same calls on identical inputs with identically seeded generators, so all ranks
draw the same tokens without communicating.
"""

from __future__ import annotations

from collections import deque
from dataclasses import fields, replace
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .engine import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Chunk, Engine, Finished, Request, SamplingParams
from .engine import admission
from .engine.params import SEED_BITS, check_prompt
from .engine.prefix_cache import PrefixCache, check_flags as check_prefix_cache, for_model as prefix_cache_for
from .engine.speculative import Speculation
from .model.decode_step import DecodeStep
from .model.transformer import Transformer
from .tokenizers import BaseTokenizer

_SAMPLING_OPTIONS = {f.name for f in fields(SamplingParams)} - {"max_tokens", "temperature", "top_p", "logprobs",
                                                                  "prompt_logprobs", "n", "stop"}


class TokenGenerator:
    """A model with its tokenizer and engine: continues token prompts, in batches (`generate`) or streamed
    (`stream_generate`), each answer ending at any of `stop_ids`.

    The engine owns the KV cache's rows: a stream left paused keeps its rows (and goes on decoding while other
    calls step the engine) until it is finished or closed.
    """

    def __init__(self, model: Transformer, tokenizer: BaseTokenizer, stop_ids: Sequence[int], seed: int = 1,
                 compile: bool = False, deterministic: bool = False, speculation: Optional[Speculation] = None,
                 prefix_cache: bool = True, prefix_cache_gib: Optional[float] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)  # an answer ends at any of these
        self.device = model.rope.device
        self.deterministic = deterministic
        self._seed = seed  # the next sequence's seed: a call's first row draws as a request seeded `seed` would
        self._decode = DecodeStep(model, compiled=compile, full_window=deterministic)
        self.speculation = speculation  # drafter and counts, shared by every engine over this model (the server's)
        # The prefix cache's table, shared like the model's pool by every engine over this model (the server's).
        self.prefix_cache = _prefix_cache(model, prefix_cache, prefix_cache_gib) if not deterministic else None
        self.engine = self._engine(self._decode)

    def _engine(self, step: DecodeStep) -> Engine:
        """The one place this generator makes its engine: over `step`, with its speculation and prefix cache."""
        return Engine(step, self.tokenizer, self.stop_ids, deterministic=self.deterministic,
                      speculation=self.speculation, prefix_cache=self.prefix_cache)

    @property
    def max_seq_len(self) -> int:
        """Prompt plus generation never exceed this many tokens."""
        return self.model.params.max_seq_len

    @property
    def max_batch_size(self) -> int:
        return self.model.params.max_batch_size

    @property
    def decode_step(self) -> DecodeStep:
        """The decode step (eager or compiled) this generator runs: next-token logits for cache rows 0..B-1 at
        host-known positions. Public so that a second engine (llama.serve) reuses it, compiled graphs included."""
        return self._decode

    @decode_step.setter
    def decode_step(self, step: DecodeStep) -> None:
        """Run later calls through another decode step (eager or compiled, other windows): a new engine over
        the same model and cache, so call it between generations."""
        self._decode = step
        self.engine = self._engine(step)

    # --- requests to the engine ----------------------------------------------------------------------------

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], names: Optional[Sequence[str]] = None) -> None:
        """Errors name each prompt as `names[i]` (the caller's own numbering), by default "prompt i"."""
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token lists")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}")
        for i, prompt in enumerate(prompt_tokens):
            check_prompt(prompt, params.vocab_size, params.max_seq_len, names[i] if names else f"prompt {i}")

    def _params(self, max_gen_len: int, temperature: float, top_p: float, options: Dict[str, Any],
                logprobs: bool = False, echo: bool = False) -> SamplingParams:
        """The sampling parameters of one call, checked before any work (ValueError naming the bad one)."""
        _check_gen_len(max_gen_len)
        unknown = sorted(set(options) - _SAMPLING_OPTIONS)
        if unknown:
            raise ValueError(f"unknown sampling option {unknown[0]!r}; the options are "
                             f"{', '.join(sorted(_SAMPLING_OPTIONS))}")
        if isinstance(options.get("stop_token_ids"), list):
            options = {**options, "stop_token_ids": tuple(options["stop_token_ids"])}
        params = SamplingParams(max_tokens=max_gen_len, temperature=temperature, top_p=top_p,
                                logprobs=0 if logprobs else None, prompt_logprobs=echo and logprobs, **options)
        return params.check(self.model.params.vocab_size)

    def _next_seed(self) -> int:
        seed, self._seed = self._seed, (self._seed + 1) % 2 ** SEED_BITS
        return seed

    def _loras(self, lora: Any, n: int) -> List[Optional[str]]:
        """Each prompt's adapter: `lora` is None (the base), one name for all, or a list of n (None: the base)."""
        names = list(lora) if isinstance(lora, (list, tuple)) else [lora] * n
        if len(names) != n:
            raise ValueError(f"lora lists {len(names)} adapters for {n} prompts")
        for name in names:
            self.engine.check_lora(name)
        return names

    def _events(self, prompt_tokens: Sequence[Sequence[int]], params: SamplingParams,
                loras: Optional[Sequence[Optional[str]]] = None) -> Iterator[Tuple[int, Any]]:
        """Add each prompt as a request (its room in the context caps max_tokens) and yield (prompt index,
        event) as the engine produces them. Closing the iterator cancels what is unfinished."""
        events: Deque[Tuple[int, Any]] = deque()
        requests = []
        loras = loras or [None] * len(prompt_tokens)
        for i, prompt in enumerate(prompt_tokens):
            room = min(params.max_tokens, self.max_seq_len - len(prompt))
            seed = params.seed if params.seed is not None else self._next_seed()
            requests.append(Request(list(prompt), replace(params, max_tokens=room, seed=seed),
                                    lambda event, i=i: events.append((i, event)), id=f"call-{i}", lora=loras[i]))
        waiting, open_ = deque(requests), len(requests)
        try:
            while open_:
                while (request := admission.next_admissible(self.engine, waiting)) is not None:
                    waiting.remove(request)
                    self.engine.add(request)
                if not events:
                    self.engine.step()  # a failure ends this call's requests with 'error' events (raised below)
                while events:
                    i, event = events.popleft()
                    open_ -= isinstance(event, Finished)
                    if isinstance(event, Finished) and event.reason == "error":
                        raise RuntimeError(f"generation failed: {event.message}")
                    yield i, event
        finally:
            for request in requests:
                request.cancelled = True  # finished ones ignore it; the rest free their rows at the next step

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        logprobs: bool = False,
        echo: bool = False,
        **sampling: Any,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt; returns the new tokens (the prompt too with echo) without EOS, and log-probs.

        `sampling` takes the engine's other options: top_k, min_p, presence_penalty, frequency_penalty,
        repetition_penalty, logit_bias, seed, stop_token_ids (see llama/engine/params.py), and `lora`: the
        adapter of a model built with several (a name for every prompt, or a list with one per prompt)."""
        self._check_prompts(prompt_tokens)
        loras = self._loras(sampling.pop("lora", None), len(prompt_tokens))
        params = self._params(max_gen_len, temperature, top_p, sampling, logprobs, echo)
        out_tokens: List[List[int]] = [list(p) if echo else [] for p in prompt_tokens]
        out_logprobs: List[List[float]] = [[] for _ in prompt_tokens]
        if max_gen_len > 0 or params.prompt_logprobs:
            for i, event in self._events(prompt_tokens, params, loras):
                if isinstance(event, Chunk):
                    if event.prompt_logprobs is not None:
                        out_logprobs[i] = event.prompt_logprobs + out_logprobs[i]
                    out_tokens[i] += event.tokens
                    out_logprobs[i] += [entry.logprob for entry in event.logprobs]
        return out_tokens, (out_logprobs if logprobs else None)

    # --- streaming -------------------------------------------------------------------------------------------

    def stream_generate(
        self,
        prompt_tokens: List[int],
        max_gen_len: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        **sampling: Any,
    ) -> Iterator[str]:
        """Yield the continuation of one prompt as text, chunk by chunk, as tokens are produced.

        The chunks join to exactly `tokenizer.decode` of the generated tokens: SentencePiece word-boundary
        spaces are kept, and bytes of a character split over byte-fallback tokens are held back until the
        character is complete. Every rank yields the same chunks, so model-parallel ranks stay in step as long
        as they all consume (or stop consuming) the stream at the same chunk. Closing the iterator early frees
        its row. Arguments are checked here, at the call.
        """
        self._check_prompts([prompt_tokens])
        loras = self._loras(sampling.pop("lora", None), 1)
        params = self._params(max_gen_len, temperature, top_p, sampling)
        return self._stream_text(prompt_tokens, params, loras)

    def _stream_text(self, prompt_tokens: List[int], params: SamplingParams, loras=None) -> Iterator[str]:
        if params.max_tokens == 0:
            return
        events = self._events([prompt_tokens], params, loras)
        try:
            while True:
                with torch.inference_mode():  # only while computing: never across a yield, into the caller
                    item = next(events, None)
                if item is None:
                    break
                if isinstance(item[1], Chunk) and item[1].text:
                    yield item[1].text
        finally:
            events.close()

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len


def _check_gen_len(max_gen_len) -> None:
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")


def _prefix_cache(model: Transformer, enabled: bool, gib: Optional[float]) -> Optional[PrefixCache]:
    """The model's prefix cache (its block pool allocated), or None when it is off."""
    check_prefix_cache(enabled, gib)
    return prefix_cache_for(model, gib) if enabled and model.has_cache else None
