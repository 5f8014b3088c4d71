"""Decode attention over the paged pool on PyTorch's operators: one query token per row, over that row's blocks.

A bfloat16 (or float32) pool: up to PIECE positions, a step gathers the rows' blocks (kv_cache.KVPool.gather) and
runs SDPA over them, the row cache's arithmetic. Beyond, gathering the whole context copied it once per layer and
step (100 MB per layer at 100k positions of the 1.1B shape), which SDPA then read back from memory: that copy
made the paged PyTorch path 0.6x of the row cache at 100k. Longer rows are attended in pieces of PIECE
positions instead: each piece's blocks are gathered into the same small scratch buffers, which stay in the CPU's
cache while SDPA reads them, and the pieces' results are merged in order with their log-sum-exps (the running
softmax that decode.c's pieces use too), so the pool is read from memory once per step.

An int8 pool (kv_int8.py): dequantizing the gathered codes in bfloat16 (a pass over every element, slow in
bfloat16 on a CPU) cost more than its halved bytes saved. Its tokens attend in float32 instead, with the scales
folded into the scores and the probabilities: s = (q . codes) * k_scale / sqrt(d), out = sum (p * v_scale) codes,
so only the int8 -> float32 conversion touches every element (what decode.c does in its loop: the stored values,
codes * scale, without rounding them to bfloat16).

Pieces start at fixed positions whatever the batch holds, so a row attended alone (deterministic mode) depends on
its own positions only; a shorter row's pieces past its end are fully masked and weigh exactly 0.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

PIECE = 4096  # positions of one row per piece (a multiple of the block size)
INT8_PIECE = 2 ** 20  # int8 path: codes per piece and tensor, all rows together (4 MiB once in float32)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU kernel with its log-sum-exp (B, H, L), float32; mask additive, of q's dtype."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)


def attend_token(q: torch.Tensor, pool, where) -> torch.Tensor:
    """q (B, KV, n_rep, D): each row's one token, its query heads grouped by the KV head they read, over the row's
    first `where.window` positions in `pool`, held by its blocks where.blocks (B, n), visible where where.mask
    (B, 1, window) is True. Returns (B, KV, n_rep, D)."""
    if hasattr(pool, "gather_codes"):
        return _int8_token(q, pool, where)
    window = where.window
    if window <= PIECE or q.device.type != "cpu" or torch.compiler.is_compiling():
        keys, values = pool.read(where.blocks, window, reuse=True)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=where.mask.unsqueeze(1))
    bsz = q.shape[0]
    spans, indices = _pieces(pool, where, PIECE // pool.block_size)
    additive = torch.where(where.mask[:, 0], 0.0, float("-inf")).to(q.dtype)[:, None, None]
    outs = q.new_empty((len(spans), *q.shape))
    lses = torch.empty((len(spans), *q.shape[:3]), dtype=torch.float32, device=q.device)
    for c, ((start, end), index) in enumerate(zip(spans, indices)):
        keys, values = pool.gather(index, bsz, end - start, reuse=True)
        outs[c], lses[c] = _flash(q, keys, values, additive[..., start:end])
    # A piece with no visible position (a short row beside a long one) reports a log-sum-exp of 0: weigh it 0.
    seen = torch.stack([where.mask[:, 0, start:end].any(-1) for start, end in spans]).view(len(spans), bsz, 1, 1)
    lses.masked_fill_(~seen, float("-inf"))
    weights = (lses - lses.amax(0)).exp_()  # position 0 is always visible: the top is finite
    merged = (outs.float() * weights.unsqueeze(-1)).sum(0) / weights.sum(0).unsqueeze(-1)
    return merged.to(q.dtype)


def _pieces(pool, where, per: int) -> Tuple[List[Tuple[int, int]], List[torch.Tensor]]:
    """A step's pieces of `per` blocks: each one's positions (start, end) within the window and its (block, head)
    index (B x H x blocks, flat) in SDPA's order; the same for every layer, so kept on `where`."""
    cached = getattr(where, "pieces", None)
    if cached is not None and cached[0] == (pool.k.shape[1], per):
        return cached[1], cached[2]
    index = pool.index(where.blocks)  # (B, H, n)
    size, n, window = pool.block_size, where.blocks.shape[1], where.window
    spans = [(a * size, min(window, (a + per) * size)) for a in range(0, n, per)]
    indices = [index[:, :, a:a + per].reshape(-1) for a in range(0, n, per)]
    where.pieces = ((pool.k.shape[1], per), spans, indices)
    return spans, indices


def _int8_token(q: torch.Tensor, pool, where) -> torch.Tensor:
    """attend_token over an int8 pool, in float32 with the scales folded in (see the module's docstring)."""
    bsz, heads, rep, dim = q.shape
    size = pool.block_size
    per = max(1, INT8_PIECE // (bsz * heads * size * dim))
    spans, indices = _pieces(pool, where, per)
    qf = q.float().reshape(bsz * heads, rep, dim)
    additive = torch.where(where.mask[:, 0], 0.0, float("-inf")).repeat_interleave(heads, 0).unsqueeze(1)
    tops, sums, outs = [], [], []
    for (start, end), index in zip(spans, indices):
        width = end - start
        (kc, ks), (vc, vs) = pool.gather_codes(index, reuse=True)  # (count, size, D) int8, (count, size) scales
        keys = pool.scratch_like("kf", kc, torch.float32).copy_(kc).view(bsz * heads, -1, dim)[:, :width]
        values = pool.scratch_like("vf", vc, torch.float32).copy_(vc).view(bsz * heads, -1, dim)[:, :width]
        k_scale = ks.view(bsz * heads, 1, -1)[..., :width].float() * (1 / math.sqrt(dim))
        scores = torch.bmm(qf, keys.transpose(1, 2)).mul_(k_scale).add_(additive[..., start:end])
        top = scores.amax(-1, keepdim=True).clamp_(min=-1e30)  # a fully masked piece: all weights exp(-inf) = 0
        probs = scores.sub_(top).exp_()
        sums.append(probs.sum(-1, keepdim=True))
        outs.append(torch.bmm(probs.mul_(vs.view(bsz * heads, 1, -1)[..., :width].float()), values))
        tops.append(top)
    if len(outs) == 1:
        merged = outs[0] / sums[0]
    else:
        top = torch.stack(tops).amax(0)
        weights = [(t - top).exp_() for t in tops]
        merged = sum(w * o for w, o in zip(weights, outs)) / sum(w * s for w, s in zip(weights, sums))
    return merged.view(bsz, heads, rep, dim).to(q.dtype)
