"""Decode attention over the paged pool on PyTorch's operators: one query token per row, over that row's blocks.

Up to PIECE positions, a step gathers the rows' blocks (kv_cache.KVPool.gather) and runs SDPA over them. Beyond,
gathering the whole context copied it once per layer and step (100 MB per layer at 100k positions of the 1.1B
shape), which SDPA then read back from memory: that copy made the paged PyTorch path 0.6x of the row cache it
replaced at 100k. Longer rows are attended in pieces of PIECE positions instead: each piece's blocks are
gathered (and, from an int8 pool, dequantized) into the same small scratch buffers, which stay in the CPU's
cache while SDPA reads them, and the pieces' results are merged in order with their log-sum-exps (the running
softmax that decode.c's pieces use too). The pool is then read from memory once per step.

Pieces start at multiples of PIECE whatever the batch, so a row's arithmetic depends only on its own positions
(a shorter row's pieces past its end are fully masked and weigh exactly 0), as deterministic mode needs.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

PIECE = 4096  # positions attended per piece (a multiple of the block size)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU kernel with its log-sum-exp (B, H, L), float32; mask additive, of q's dtype."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)


def in_pieces(q: torch.Tensor, window: int) -> bool:
    """Whether a step attends in pieces: a window longer than one piece, eager, on a CPU (where SDPA's kernel
    returns the log-sum-exps that merge pieces)."""
    return window > PIECE and q.device.type == "cpu" and not torch.compiler.is_compiling()


def attend_token(q: torch.Tensor, pool, where) -> torch.Tensor:
    """q (B, KV, n_rep, D): each row's one token, its query heads grouped by the KV head they read, over the row's
    first `where.window` positions in `pool`, held by its blocks where.blocks (B, n), visible where where.mask
    (B, 1, window) is True. Returns (B, KV, n_rep, D)."""
    if not in_pieces(q, where.window):
        keys, values = pool.read(where.blocks, where.window, reuse=True)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=where.mask.unsqueeze(1))
    index, additive, seen = _plan(pool, where, q.dtype)
    count, bsz = index.shape[0], q.shape[0]
    outs = q.new_empty((count, *q.shape))
    lses = torch.empty((count, *q.shape[:3]), dtype=torch.float32, device=q.device)
    for c in range(count):
        keys, values = pool.gather(index[c], bsz, PIECE, reuse=True)
        outs[c], lses[c] = _flash(q, keys, values, additive[:, c, None, None])
    # A piece with no visible position (a short row beside a long one) reports a log-sum-exp of 0: weigh it 0.
    lses.masked_fill_(~seen, float("-inf"))
    weights = (lses - lses.amax(0)).exp_()  # position 0 is always visible: the top is finite
    merged = (outs.float() * weights.unsqueeze(-1)).sum(0) / weights.sum(0).unsqueeze(-1)
    return merged.to(q.dtype)


def _plan(pool, where, dtype: torch.dtype):
    """The pieces of a step, the same for every layer (kept on `where`): each piece's (block, head) index (count,
    B x H x per) in SDPA's order, the additive mask (B, count, PIECE) and whether a row sees any of a piece's
    positions (count, B, 1, 1). Every piece has the same shape: the tables padded with the null block, the mask
    with masked positions."""
    cached = getattr(where, "pieces", None)
    if cached is not None and cached[0] == pool.k.shape[1] and cached[1] == dtype:
        return cached[2:]
    blocks, window = where.blocks, where.window
    bsz, n = blocks.shape
    per = PIECE // pool.block_size
    count = -(-n // per)
    table = F.pad(blocks, (0, count * per - n)).view(bsz, count, per).transpose(0, 1)
    index = pool.index(table.reshape(count * bsz, per)).view(count, -1)
    visible = F.pad(where.mask[:, 0], (0, count * PIECE - window)).view(bsz, count, PIECE)
    additive = torch.where(visible, 0.0, float("-inf")).to(dtype)
    seen = visible.any(-1).t().view(count, bsz, 1, 1)
    where.pieces = (pool.k.shape[1], dtype, index, additive, seen)
    return index, additive, seen
