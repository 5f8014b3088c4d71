"""The prefix cache: which pool blocks hold the keys and values of which token prefixes.

Prompts that share a start (a system prompt, few-shot examples, a conversation's earlier turns) share the keys
and values of that start. Every sequence's KV lives in the model's paged pool (llama/model/kv_cache.py, blocks of
`block_size` positions); this table maps a full block of tokens to the pool block holding its KV. A block's
key is a chained hash: it covers the block's own tokens and, through its parent's key, every token before
them, so a hit on block i means the whole prefix up to block i's end matches.

The engine asks `lookup` when it admits a prompt: the longest run of cached blocks from the prompt's start goes
into the sequence's block table by reference (no copy: blocks.py counts the holders) and only the rest is
prefilled. At least the prompt's last token is always left to the prefill, which computes its logits. Once a
prompt's prefill has run (and when an answer ends or is preempted, with the answer's tokens too), `insert`
keeps its full blocks, so a half-written block never becomes a hit.

The cache keeps at most `blocks` blocks. Blocks no sequence holds are evicted least recently used first, when
the cache is over its size or the pool has no free block left. A hit refreshes its blocks from the last to the
first, so that a prefix's later blocks go before its earlier ones (a block without its parent can never hit).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ..model.kv_cache import BLOCK_SIZE, layer_block_bytes
from .blocks import BlockPool


def block_keys(tokens: Sequence[int], n_blocks: int, block_size: int, salt: bytes = b"") -> List[bytes]:
    """The chained keys of the first n_blocks full blocks of `tokens`: key i hashes key i-1 and block i's tokens;
    the first hashes `salt` (what else decides the keys and values: a LoRA adapter) as its parent."""
    keys: List[bytes] = []
    parent = hashlib.blake2b(salt, digest_size=16).digest() if salt else b""
    for i in range(n_blocks):
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


def check_gib(gib: Optional[float]) -> Optional[float]:
    """The memory bound flag: None (the default size) or a positive finite number of GiB; ValueError otherwise."""
    if gib is None:
        return None
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not math.isfinite(gib) or gib <= 0:
        raise ValueError(f"prefix_cache_gib must be a positive number of GiB (or None: the default size), got {gib!r}")
    return float(gib)


def cache_blocks(gib: Optional[float], per_block: int, pool_blocks: int, block_size: int = BLOCK_SIZE) -> int:
    """How many blocks the cache may keep: `gib` GiB of them (at most the pool), or by default the whole pool
    (a kept block that no sequence holds is free memory: the pool evicts it when it needs the block).
    ValueError when `gib` holds less than one block."""
    gib = check_gib(gib)
    if gib is None:
        return pool_blocks
    blocks = int(gib * 2 ** 30 // per_block)
    if blocks < 1:
        raise ValueError(f"prefix_cache_gib {gib:g} holds no block: one block of {block_size} positions takes "
                         f"{per_block} bytes ({per_block / 2 ** 30:.2g} GiB) per process")
    return min(blocks, pool_blocks)


class PrefixCache:
    """The block table over a pool's blocks (see the module docstring), keeping at most `blocks` of them.
    Counters, in tokens as vLLM reports them: `queries` (prompt tokens looked up) and `hits` (of those, the
    ones found cached). Without a pool it makes its own (a table alone, for tests)."""

    def __init__(self, blocks: int, block_size: int = BLOCK_SIZE, pool: Optional[BlockPool] = None) -> None:
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"the prefix cache needs at least one block, got {blocks!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.blocks = blocks
        self.block_size = block_size
        self.pool = pool if pool is not None else BlockPool(blocks + 1)
        self.pool.cache = self
        self._table: "OrderedDict[bytes, int]" = OrderedDict()  # key -> block, least recently used first
        self.queries = 0
        self.hits = 0

    @property
    def in_use(self) -> int:
        """Blocks the cache keeps."""
        return len(self._table)

    def lookup(self, tokens: Sequence[int], salt: bytes = b"") -> List[int]:
        """The pool blocks holding the longest cached run of `tokens`' full blocks from its start, leaving at
        least the last token out (its logits must be computed). Counts the query and the hit, and refreshes
        the blocks found. The caller takes its own reference on each (`pool.ref`)."""
        self.queries += len(tokens)
        keys = block_keys(tokens, (len(tokens) - 1) // self.block_size, self.block_size, salt)
        found: List[int] = []
        for key in keys:
            block = self._table.get(key)
            if block is None:
                break
            found.append(block)
        for key in reversed(keys[:len(found)]):
            self._table.move_to_end(key)
        self.hits += len(found) * self.block_size
        return found

    def insert(self, tokens: Sequence[int], blocks: Sequence[int], salt: bytes = b"") -> int:
        """Keep the full blocks of `tokens`, whose KV pool blocks `blocks` hold (a sequence's table), unless
        their key is kept already (the cached ones are refreshed). Returns how many were added."""
        n = min(len(tokens) // self.block_size, len(blocks))
        keys = block_keys(tokens, n, self.block_size, salt)
        added = 0
        for key, block in zip(keys, blocks):
            if key in self._table or self.pool.cached.get(block):
                continue
            if len(self._table) >= self.blocks and not self.evict():
                break
            self.pool.ref(block)
            self.pool.mark_cached(block, True)
            self._table[key] = block
            added += 1
        for key in reversed(keys):  # most recently used: the prefix's first block most of all
            if key in self._table:
                self._table.move_to_end(key)
        return added

    def evict(self) -> bool:
        """Drop the least recently used block that no sequence holds; False when there is none."""
        for key, block in self._table.items():
            if self.pool.holders(block) == 1:
                del self._table[key]
                self.pool.mark_cached(block, False)
                self.pool.unref(block)
                return True
        return False

    def clear(self) -> None:
        """Forget every kept block."""
        for block in self._table.values():
            self.pool.mark_cached(block, False)
            self.pool.unref(block)
        self._table.clear()

    def stats(self) -> Dict[str, int]:
        return {"prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_blocks_in_use": self.in_use, "prefix_cache_blocks_total": self.blocks}


def check_flags(enabled: bool, gib: Optional[float]) -> None:
    """ValueError naming a bad prefix-cache setting (before any loading)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"prefix_cache must be True or False, got {enabled!r}")
    check_gib(gib)


def for_model(model, gib: Optional[float] = None) -> PrefixCache:
    """The prefix cache over a model's block pool (blocks.for_model), keeping at most `gib` GiB of blocks per
    process (default: the whole pool). A model has one table: a second generator over the same model with the
    same size shares it."""
    from .blocks import for_model as pool_for

    pool = pool_for(model)
    cache = model.layers[0].attention.cache
    per_block = model.params.n_layers * layer_block_bytes(cache)  # whatever the pool stores (int8 KV: codes, scales)
    blocks = cache_blocks(gib, per_block, pool.usable)
    table = pool.cache
    if isinstance(table, PrefixCache) and table.blocks == blocks:
        return table
    if isinstance(table, PrefixCache):
        table.clear()
    return PrefixCache(blocks, BLOCK_SIZE, pool)
