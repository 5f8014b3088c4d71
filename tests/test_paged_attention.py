"""Decode attention in pieces (llama/model/paged_attention.py) against attention written out in float64.

Rows longer than a piece are attended piece by piece and merged by log-sum-exp; the pieces are made small here
(a few blocks) so that short test rows take that path, beside a row that ends before the last piece (its later
pieces see nothing and must weigh 0). The reference reads each row's positions straight from the pool by its
block table and computes softmax(q k / sqrt(d)) v in float64.
"""

import math

import pytest
import torch

from llama.model import paged_attention
from llama.model.kv_cache import GatherScratch, KVPool, Rows
from llama.model.kv_int8 import KVPoolInt8

BLOCK, HEADS, REP, DIM = 16, 2, 3, 8


def _pool(kind: str, blocks: int) -> KVPool:
    torch.manual_seed(0)
    if kind == "int8":
        pool = KVPoolInt8(blocks, BLOCK, HEADS, DIM, torch.float32, scratch=GatherScratch())
    else:
        pool = KVPool(blocks, BLOCK, HEADS, DIM, torch.float32, scratch=GatherScratch())
    slots = torch.arange(BLOCK, blocks * BLOCK)  # every block but the null one
    pool.write(slots, torch.randn(len(slots), HEADS, DIM), torch.randn(len(slots), HEADS, DIM))
    return pool


def _values(pool: KVPool, name: str) -> torch.Tensor:
    """The pool's stored keys or values (blocks, H, size, D) in float64, as decode.c reads them."""
    data = getattr(pool, name).double()
    scale = getattr(pool, name + "_scale", None)
    return data if scale is None else data * scale.double().unsqueeze(-1)


def _reference(q: torch.Tensor, pool: KVPool, blocks: torch.Tensor, lengths) -> torch.Tensor:
    keys, values = _values(pool, "k"), _values(pool, "v")
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, length in enumerate(lengths):
        held = torch.cat([keys[blk] for blk in blocks[b].tolist()], dim=1)[:, :length]  # (H, T, D)
        vals = torch.cat([values[blk] for blk in blocks[b].tolist()], dim=1)[:, :length]
        scores = torch.einsum("hrd,htd->hrt", q[b].double(), held) / math.sqrt(DIM)
        out[b] = torch.einsum("hrt,htd->hrd", scores.softmax(-1), vals)
    return out


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_pieces_merge_to_the_whole_softmax(kind, monkeypatch):
    monkeypatch.setattr(paged_attention, "PIECE", 3 * BLOCK)  # a float32 pool: pieces of 3 blocks
    monkeypatch.setattr(paged_attention, "PIECE_ELEMENTS", 2 * HEADS * BLOCK * DIM * 2)  # int8: 2 blocks a piece
    pool = _pool(kind, 40)
    # three rows, blocks scattered over the pool: one long, one ending inside an early piece, one a single block
    lengths = [9 * BLOCK + 5, 2 * BLOCK + 3, 7]
    window = max(lengths)
    n = -(-window // BLOCK)
    order = torch.randperm(39) + 1
    blocks = order[:3 * n].view(3, n)
    mask = torch.arange(window).view(1, 1, window) < torch.tensor(lengths).view(3, 1, 1)
    where = Rows(slots=torch.zeros(3, 1, dtype=torch.long), blocks=blocks, window=window, mask=mask)
    q = torch.randn(3, HEADS, REP, DIM)
    got = paged_attention.attend_token(q, pool, where)
    assert where.pieces is not None and len(where.pieces[1]) > 1, "the step was not cut into pieces"
    torch.testing.assert_close(got.double(), _reference(q, pool, blocks, lengths), atol=2e-5, rtol=2e-5)
    # the layers of one step share the plan: a second call reuses it and gives the same answer
    again = paged_attention.attend_token(q, pool, where)
    assert torch.equal(again, got)
