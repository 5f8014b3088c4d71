"""Whether a request can ever run on an engine: the one check of a prompt and its parameters against the
vocabulary, the rows, the context and the KV pool, made before any work (the server answers 400 with it); and
which waiting request an engine takes next."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from ..model.kv_cache import BLOCK_SIZE, blocks_for
from .params import ParamError, SamplingParams, check_prompt


def blocks_needed(prompt: int, max_tokens: int, n: int) -> int:
    """Blocks a request holds at its longest: its prompt's full blocks once, each choice's own rest."""
    shared = prompt // BLOCK_SIZE if n > 1 else 0
    return shared + n * (blocks_for(prompt + max(max_tokens, 1)) - shared)


def check(prompt: Sequence[int], params: SamplingParams, vocab_size: int, max_batch_size: int, max_seq_len: int,
          pool_blocks: int) -> None:
    """ValueError unless the request can run: token ids in the vocabulary, parameters in range, room in the
    context for prompt plus max_tokens, no more choices than rows, and blocks for all of it in the pool."""
    check_prompt(prompt, vocab_size)
    params.check(vocab_size)
    if params.n > max_batch_size:
        raise ParamError(f"n={params.n} choices need as many rows; there are {max_batch_size} (max_batch_size)", "n")
    if len(prompt) > max_seq_len or (params.max_tokens and len(prompt) >= max_seq_len):
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context (max_seq_len) holds "
                         f"{max_seq_len} with the answer, so prompts may have up to {max_seq_len - 1}")
    if len(prompt) + params.max_tokens > max_seq_len:
        raise ValueError(f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} exceed the "
                         f"context (max_seq_len {max_seq_len}): ask for at most {max_seq_len - len(prompt)}")
    need = blocks_needed(len(prompt), params.max_tokens, params.n)
    if need > pool_blocks:
        raise ValueError(f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} (n={params.n}) "
                         f"need {need} KV blocks of {BLOCK_SIZE} positions; the KV pool holds {pool_blocks} "
                         f"({pool_blocks * BLOCK_SIZE} positions; see kv_cache_gib)")


def next_admissible(engine, waiting: Iterable) -> Optional[object]:
    """The first of the waiting requests (in arrival order) that `engine.add` takes now, or None. One that waits
    only for a LoRA adapter's slot (every slot busy with other adapters) lets those behind it go first (the base, a
    loaded adapter), and goes first itself once a slot frees; one that waits for rows or KV blocks holds the rest
    back (first come, first served: a big request is never starved by small ones)."""
    for request in waiting:
        if engine.can_add(request):
            return request
        if not engine.can_add(request, adapter=False):
            return None
    return None


def check_prefill_budget(max_prefill_tokens: Optional[int]) -> Optional[int]:
    """An engine's max_prefill_tokens: a positive integer, or None (no limit); ValueError naming it otherwise."""
    if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int)
                                           or isinstance(max_prefill_tokens, bool) or max_prefill_tokens < 1):
        raise ValueError(f"max_prefill_tokens must be a positive integer or None, got {max_prefill_tokens!r}")
    return max_prefill_tokens
