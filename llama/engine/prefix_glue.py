"""The engine's use of the prefix cache (prefix_cache.py): cached blocks mapped into a choice's block table at
admission, and full blocks kept once their keys and values are written."""

from __future__ import annotations

from typing import Sequence

from ..model.kv_cache import BLOCK_SIZE
from .state import Choice


class PrefixGlue:
    def __init__(self, engine) -> None:
        self.e = engine

    def map_cached(self, c: Choice) -> None:
        """Start c's block table with the longest cached run of its tokens' full blocks, by reference (no copy),
        so that only the rest is prefilled. A prompt wanting every position's log-probs is prefilled whole."""
        e = self.e
        if e.prefix_cache is None or (c.request.params.prompt_logprobs and not c.resumed):
            return
        blocks = e.prefix_cache.lookup(c.tokens, salt=self.salt(c))
        for block in blocks:
            e.pool.ref(block)
        c.blocks, c.filled = list(blocks), len(blocks) * BLOCK_SIZE
        if blocks:
            e.table_updates.append((c.row, 0, list(blocks)))

    def keep(self, c: Choice, tokens: Sequence[int]) -> None:
        """Keep the full blocks of `tokens`, whose keys and values c's blocks hold (after a model call that
        wrote them returned)."""
        if self.e.prefix_cache is not None and c.blocks:
            self.e.prefix_cache.insert(tokens, c.blocks, salt=self.salt(c))

    def salt(self, c: Choice) -> bytes:
        """What starts c's block keys: its LoRA adapter (the same prompt under two adapters has other keys and
        values), empty for the base."""
        return b"" if c.request.lora is None else self.e.loras.key(c.request.lora)
