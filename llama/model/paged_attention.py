"""Decode attention over the paged pool on PyTorch's operators: one query token per row, over that row's blocks.

Up to PIECE positions, a step gathers the rows' blocks (kv_cache.KVPool.gather) and runs SDPA over them, the row
cache's arithmetic. Beyond, gathering the whole context copied it once per layer and step (100 MB per layer at
100k positions of the 1.1B shape), which SDPA then read back from memory: that copy made the paged PyTorch path
0.6x of the row cache at 100k. Longer rows are attended in pieces of PIECE positions instead: each piece's blocks are
gathered into the same small scratch buffers, which stay in the CPU's cache while SDPA reads them, and the
pieces' results are merged in order with their log-sum-exps (the running softmax that decode.c's pieces use
too), so the pool is read from memory once per step.

An int8 pool (kv_int8.py) is attended in float32 (its `attend_dtype`): its codes times their scales are exact
there, as decode.c computes them, and on a CPU converting int8 to float32 and scaling in place costs a third of
a bfloat16 dequantization, whose pass over every element had made int8 KV decode 0.77-0.92x of bfloat16 KV.

The pieces are cut from the step's window (the longest row) in even sizes, so a row attended alone (deterministic
mode) depends on its own length only; a shorter row's pieces past its end are fully masked and weigh exactly 0.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

PIECE = 4096  # positions of one row per piece (a multiple of the block size)
PIECE_ELEMENTS = 2 ** 20  # an int8 pool's pieces: key elements of every row and head (4 MiB in float32)
# SDPA's CPU kernel that also returns the log-sum-exp the merge needs: a private op of PyTorch (2.13 has it); where
# a build lacks it, every step takes the one-call path.
_HAS_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU kernel with its log-sum-exp (B, H, L), float32; mask additive, of q's dtype."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)


def attend_token(q: torch.Tensor, pool, where) -> torch.Tensor:
    """q (B, KV, n_rep, D): each row's one token, its query heads grouped by the KV head they read, over the row's
    first `where.window` positions in `pool`, held by its blocks where.blocks (B, n), visible where where.mask
    (B, 1, window) is True. Returns (B, KV, n_rep, D) in q's dtype."""
    window, dtype = where.window, pool.attend_dtype
    bsz, heads, _, dim = q.shape
    # A pool read as itself: pieces of PIECE positions whatever the batch (up to PIECE, one call: the row cache's
    # arithmetic). A converted one (int8, read in float32): pieces of PIECE_ELEMENTS keys over all rows, since
    # float32 copies of a batch's PIECE positions would no longer stay in the CPU's cache.
    per = PIECE // pool.block_size if dtype == pool.k.dtype else \
        max(1, PIECE_ELEMENTS // (bsz * heads * pool.block_size * dim))  # blocks per piece
    whole = window <= per * pool.block_size
    qa = q.to(dtype)
    if whole or not _HAS_FLASH or q.device.type != "cpu" or torch.compiler.is_compiling():
        keys, values = pool.read(where.blocks, window, reuse=True, dtype=dtype)
        return F.scaled_dot_product_attention(qa, keys, values, attn_mask=where.mask.unsqueeze(1)).to(q.dtype)
    blocks = where.blocks.shape[1]
    per = -(-blocks // -(-blocks // per))  # as many pieces, of even sizes (no piece of a few positions)
    spans, indices, additive, seen = _pieces(pool, where, per, dtype)
    outs = qa.new_empty((len(spans), *q.shape))
    lses = torch.empty((len(spans), *q.shape[:3]), dtype=torch.float32, device=q.device)
    for c, ((start, end), index) in enumerate(zip(spans, indices)):
        keys, values = pool.gather(index, bsz, end - start, reuse=True, dtype=dtype)
        outs[c], lses[c] = _flash(qa, keys, values, additive[..., start:end])
    lses.masked_fill_(~seen, float("-inf"))  # a piece a row sees nothing of weighs 0 (see _pieces)
    weights = (lses - lses.amax(0)).exp_()  # position 0 is always visible: the top is finite
    merged = (outs.float() * weights.unsqueeze(-1)).sum(0) / weights.sum(0).unsqueeze(-1)
    return merged.to(q.dtype)


def _pieces(pool, where, per: int, dtype: torch.dtype):
    """A step's pieces of `per` blocks, the same for every layer, so planned once and kept on `where`: each one's
    positions (start, end) within the window, its (block, head) index (B x H x blocks, flat) in SDPA's order, the
    additive mask (B, 1, 1, window) of `dtype`, and which rows see any of each piece (pieces, B, 1, 1): a piece with
    no visible position (a short row beside a long one) reports a log-sum-exp of 0, so it must be weighed out."""
    key = (pool.k.shape[1], per, dtype)
    cached = getattr(where, "pieces", None)
    if cached is not None and cached[0] == key:
        return cached[1:]
    index = pool.index(where.blocks)  # (B, H, n)
    size, n, window = pool.block_size, where.blocks.shape[1], where.window
    spans = [(a * size, min(window, (a + per) * size)) for a in range(0, n, per)]
    indices = [index[:, :, a:a + per].reshape(-1) for a in range(0, n, per)]
    visible = where.mask[:, 0]
    additive = torch.where(visible, 0.0, float("-inf")).to(dtype)[:, None, None]
    seen = torch.stack([visible[:, start:end].any(-1) for start, end in spans]).view(len(spans), -1, 1, 1)
    where.pieces = (key, spans, indices, additive, seen)
    return where.pieces[1:]
