"""The host side of the paged KV cache: which pool blocks are free, and how many holders each block has.

The model's pool (llama/model/kv_cache.py) has `total` blocks; block 0 is the null block and is never handed out. A
block is held by every sequence whose block table names it and by the prefix cache while it keeps the block's
tokens (prefix_cache.py). Sharing is by reference: a prefix-cache hit, or the n choices of one request, name
the same blocks, and a block returns to the free list when its last holder lets go. A block that only the
prefix cache holds is free memory too: `allocate` evicts the least recently used such block when the free
list is empty.

One pool serves every engine over a model (the library's and the server's take turns), so it lives on the
model (`for_model`).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..model.kv_cache import NULL_BLOCK


class BlockPool:
    """Free list and reference counts of a pool of `total` blocks (block 0, the null block, excluded)."""

    def __init__(self, total: int) -> None:
        if not isinstance(total, int) or isinstance(total, bool) or total < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {total!r}")
        self.total = total
        self._free: List[int] = list(range(total - 1, NULL_BLOCK, -1))
        self._refs: Dict[int, int] = {}
        self.cache = None  # the prefix cache keeping blocks (it registers itself); asked to evict when none is free
        self.cached: Dict[int, bool] = {}  # blocks the prefix cache holds
        self.idle_cached = 0  # of those, the ones no sequence holds (evictable)

    @property
    def usable(self) -> int:
        """Blocks that sequences can hold (all but the null block)."""
        return self.total - 1

    @property
    def in_use(self) -> int:
        """Blocks held by a sequence or the prefix cache."""
        return len(self._refs)

    def available(self) -> int:
        """Blocks that `allocate` can hand out now: free ones and those only the prefix cache keeps."""
        return len(self._free) + self.idle_cached

    def allocate(self) -> Optional[int]:
        """A block with one holder, or None when every block is held by a sequence."""
        if not self._free and self.cache is not None:
            self.cache.evict()
        if not self._free:
            return None
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def ref(self, block: int) -> None:
        """One more holder (a sequence mapping a cached or shared block, or the prefix cache keeping it)."""
        count = self._refs[block]
        self._refs[block] = count + 1
        if count == 1 and self.cached.get(block):
            self.idle_cached -= 1

    def unref(self, block: int) -> None:
        """One holder fewer; the block is free when none is left."""
        count = self._refs[block] - 1
        if count:
            self._refs[block] = count
            if count == 1 and self.cached.get(block):
                self.idle_cached += 1
            return
        del self._refs[block]
        self._free.append(block)

    def holders(self, block: int) -> int:
        return self._refs.get(block, 0)

    def mark_cached(self, block: int, cached: bool) -> None:
        """The prefix cache starts (True, after taking its reference) or stops (False, before dropping it)
        keeping `block`."""
        was = self.cached.pop(block, False)
        if was and self._refs.get(block) == 1:
            self.idle_cached -= 1
        if cached:
            self.cached[block] = True
            if self._refs.get(block) == 1:
                self.idle_cached += 1


def for_model(model) -> BlockPool:
    """The block pool of a model's KV pool, made once per pool (a new `setup_cache` makes a new one)."""
    pool = getattr(model, "block_pool", None)
    if not isinstance(pool, BlockPool) or pool.total != model.pool_blocks or \
            getattr(model, "_block_pool_of", None) is not model.layers[0].attention.cache.k:
        pool = BlockPool(model.pool_blocks)
        model.block_pool = pool
        model._block_pool_of = model.layers[0].attention.cache.k
    return pool
