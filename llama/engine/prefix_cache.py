"""The prefix cache's block table: which pool blocks hold the keys and values of which token prefixes.

Prompts that share a start (a system prompt, few-shot examples, a conversation's earlier turns) share the keys
and values of that start. The model keeps a pool of KV blocks beside its row cache (`Transformer.setup_blocks`:
`block_size` positions of every layer per block, preallocated once under a memory bound). This table maps a
full block of tokens to the pool block holding its KV. A block's key is a chained hash: it covers the block's
own tokens and, through its parent's key, every token before them, so a hit on block i means the whole prefix
up to block i's end matches.

The engine asks `lookup` when it admits a prompt: the longest run of cached blocks from the prompt's start is
copied into the request's row (a copy, far cheaper than computing them) and only the rest is prefilled. At
least the prompt's last token is always left to the prefill, which computes its logits. After a prompt is
prefilled (and when an answer ends, with the answer's tokens too), `reserve` picks pool blocks for its full
blocks not cached yet; the engine copies the row into them through the step plan, and only once that model
call has returned does `commit` enter them into the table (`release` gives them back when it failed), so a
half-written block never becomes a hit.

Unused blocks are evicted least recently used first. A hit refreshes its blocks from the last to the first,
so that a prefix's later blocks go before its earlier ones (a block without its parent can never hit).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

BLOCK_SIZE = 16  # positions per pool block
DEFAULT_FRACTION = 0.25  # default pool size: this fraction of the row cache, but at least one whole context


def block_keys(tokens: Sequence[int], n_blocks: int, block_size: int) -> List[bytes]:
    """The chained keys of the first n_blocks full blocks of `tokens`: key i hashes key i-1 and block i's tokens."""
    keys: List[bytes] = []
    parent = b""
    for i in range(n_blocks):
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


def block_bytes(n_layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one pool block takes on one process: keys and values of block_size positions in every layer."""
    return 2 * n_layers * kv_heads * head_dim * block_size * dtype.itemsize


def check_gib(gib: Optional[float]) -> Optional[float]:
    """The memory bound flag: None (the default size) or a positive finite number of GiB; ValueError otherwise."""
    if gib is None:
        return None
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not math.isfinite(gib) or gib <= 0:
        raise ValueError(f"prefix_cache_gib must be a positive number of GiB (or None: the default size), got {gib!r}")
    return float(gib)


def pool_blocks(gib: Optional[float], per_block: int, max_batch_size: int, max_seq_len: int,
                block_size: int = BLOCK_SIZE) -> int:
    """How many blocks the pool holds: `gib` GiB of them, or by default DEFAULT_FRACTION of the row cache's
    positions and at least one whole context. ValueError when `gib` holds less than one block."""
    gib = check_gib(gib)
    if gib is None:
        tokens = max(max_seq_len, int(max_batch_size * max_seq_len * DEFAULT_FRACTION))
        return -(-tokens // block_size)
    blocks = int(gib * 2 ** 30 // per_block)
    if blocks < 1:
        raise ValueError(f"prefix_cache_gib {gib:g} holds no block: one block of {block_size} positions takes "
                         f"{per_block} bytes ({per_block / 2 ** 30:.2g} GiB) per process")
    return blocks


class PrefixCache:
    """The block table over a pool of `blocks` blocks of `block_size` positions (see the module docstring).
    Counters, in tokens as vLLM reports them: `queries` (prompt tokens looked up) and `hits` (of those, the
    ones found cached)."""

    def __init__(self, blocks: int, block_size: int = BLOCK_SIZE) -> None:
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"the prefix cache needs at least one block, got {blocks!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.blocks = blocks
        self.block_size = block_size
        self._table: "OrderedDict[bytes, int]" = OrderedDict()  # key -> block, least recently used first
        self._free: List[int] = list(range(blocks - 1, -1, -1))
        self._pending: Dict[bytes, int] = {}  # reserved, being written: not hits, not evictable
        self.queries = 0
        self.hits = 0

    @property
    def in_use(self) -> int:
        """Blocks holding cached (or being written) keys and values."""
        return len(self._table) + len(self._pending)

    def lookup(self, tokens: Sequence[int]) -> List[int]:
        """The pool blocks holding the longest cached run of `tokens`' full blocks from its start, leaving at
        least the last token out (its logits must be computed). Counts the query and the hit, and refreshes
        the blocks found."""
        self.queries += len(tokens)
        keys = block_keys(tokens, (len(tokens) - 1) // self.block_size, self.block_size)
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

    def reserve(self, tokens: Sequence[int]) -> List[Tuple[int, int, bytes]]:
        """Pool blocks for the full blocks of `tokens` that are neither cached nor being written: (block index in
        the sequence, pool block, key) each, evicting the least recently used blocks as needed. The cached
        ones are refreshed. Fewer (possibly none) when every block is being written."""
        n = len(tokens) // self.block_size
        out: List[Tuple[int, int, bytes]] = []
        keys = block_keys(tokens, n, self.block_size)
        for key in reversed(keys):
            if key in self._table:
                self._table.move_to_end(key)
        for i, key in enumerate(keys):
            if key in self._table or key in self._pending:
                continue
            block = self._take()
            if block is None:
                break
            self._pending[key] = block
            out.append((i, block, key))
        return out

    def _take(self) -> Optional[int]:
        if self._free:
            return self._free.pop()
        if self._table:
            return self._table.popitem(last=False)[1]
        return None

    def commit(self, reserved: Sequence[Tuple[int, int, bytes]]) -> None:
        """The blocks were written: they are hits from now on (the most recently used, a prefix's first block
        most of all)."""
        for _, block, key in reversed(reserved):
            if self._pending.pop(key, None) == block:
                self._table[key] = block

    def release(self, reserved: Sequence[Tuple[int, int, bytes]]) -> None:
        """The write failed or never ran: the blocks go back to the free list."""
        for _, block, key in reserved:
            if self._pending.pop(key, None) == block:
                self._free.append(block)

    def clear(self) -> None:
        """Forget every cached block (after the pool's contents were lost or overwritten)."""
        self._free.extend(self._table.values())
        self._table.clear()

    def stats(self) -> Dict[str, int]:
        return {"prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_blocks_in_use": self.in_use, "prefix_cache_blocks_total": self.blocks}


def check_flags(enabled: bool, gib: Optional[float]) -> None:
    """ValueError naming a bad prefix-cache setting (before any loading)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"prefix_cache must be True or False, got {enabled!r}")
    check_gib(gib)


def for_model(model, gib: Optional[float] = None, block_size: int = BLOCK_SIZE) -> PrefixCache:
    """Allocate a model's block pool (`gib` GiB per process, or the default size) and return its table. A model
    has one pool and one table: a second generator over the same model with the same size shares them."""
    cache = model.layers[0].attention.cache
    p = model.params
    per_block = block_bytes(p.n_layers, cache.k.shape[1], cache.k.shape[3], block_size, cache.k.dtype)
    blocks = pool_blocks(gib, per_block, p.max_batch_size, p.max_seq_len, block_size)
    table = getattr(model, "prefix_table", None)
    if isinstance(table, PrefixCache) and (table.blocks, table.block_size) == (blocks, block_size):
        return table
    model.setup_blocks(blocks, block_size)
    if isinstance(table, PrefixCache):  # its blocks are gone: an engine still holding it finds nothing
        table.clear()
    model.prefix_table = PrefixCache(blocks, block_size)
    return model.prefix_table
