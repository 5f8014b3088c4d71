"""The paged KV cache: one pool of fixed-size blocks per layer, and a block table per running sequence.

Every layer's keys and values live in a pool of `blocks` blocks of BLOCK_SIZE positions, laid out
(blocks, kv_heads, block_size, head_dim), so that a call's new keys are written with one indexed copy and a
sequence's blocks are read with one gather. A sequence (a batch row, 0..max_batch_size-1) sees the pool
through its row of the block table: entry j names the pool block holding its positions j*block_size onwards.
Block 0 is the null block: it is never given to a sequence, unused table entries point at it, and idle rows of
a fixed-shape decode (position -1) write there, so a row that holds nothing never touches a block that another
sequence or the prefix cache owns. Memory is spent on the tokens held, not on rows times max_seq_len.

Which blocks a sequence holds is decided on the host (llama/engine/blocks.py); the model only reads the table.
Built alone (`setup_cache(blocks=None)`), a model maps each row to its own consecutive blocks, which gives the
row cache's behaviour to callers that use the model directly (tests, benchmarks, a draft model).

Attention over the table gathers each row's blocks for its first `window` positions, then runs SDPA over them
(see README, "The paged KV cache", for the alternatives measured); the fused CPU decode step (cpu/csrc/decode.c)
reads the blocks in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

BLOCK_SIZE = 16  # positions per block, the same for every batch (deterministic mode relies on it)
NULL_BLOCK = 0


KV_DTYPES = ("int8",)  # besides None / "auto": the model's own dtype (kv_int8.py: the int8 pool)
SCALE_DTYPE = torch.bfloat16


def check_kv_dtype(kv_dtype: Union[str, None]) -> Optional[str]:
    """kv_dtype: None or "auto" (the model's dtype, returned as None) or "int8"; ValueError naming anything else."""
    if kv_dtype is None or kv_dtype == "auto":
        return None
    if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be 'auto' (the model's dtype) or one of {list(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def position_bytes(head_dim: int, dtype: torch.dtype, kv_dtype: Optional[str]) -> int:
    """Bytes of one position's key (or value) in one KV head: head_dim values of the model's dtype, or in int8
    head_dim codes and a bfloat16 scale."""
    if check_kv_dtype(kv_dtype) is None:
        return head_dim * dtype.itemsize
    return head_dim + SCALE_DTYPE.itemsize


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


class KVPool(nn.Module):
    """One layer's keys and values: (blocks, kv_heads, block_size, head_dim) each, zeroed (a masked position's
    value must be finite: 0 * NaN would reach the output). Head-major within a block, so that one head's positions
    are contiguous 16 at a time: the C decode step streams them without touching the other heads' bytes (a
    token-major layout made its attention 3-5x slower at 10k-100k positions), and a row's blocks, gathered one
    (block, head) piece at a time, land in the (B, H, T, D) layout that SDPA reads fastest, the row cache's."""

    def __init__(self, blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 scratch: Optional["GatherScratch"] = None) -> None:
        super().__init__()
        shape = (blocks, n_kv_heads, block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)
        self.scratch = scratch  # where `read(reuse=True)` gathers (shared by the layers of one model)

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: bool = True) -> None:
        """Store k, v (..., H, D) at flat pool positions `slots` (block * block_size + offset; same leading shape).
        (stored: a pool that changes the values, int8's, returns them when asked; this one keeps them as given.)"""
        heads, dim = k.shape[-2:]
        flat = slots.reshape(-1)
        block, offset = flat // self.block_size, flat % self.block_size
        self.k[block, :, offset] = k.reshape(-1, heads, dim)
        self.v[block, :, offset] = v.reshape(-1, heads, dim)

    def index(self, blocks: torch.Tensor) -> torch.Tensor:
        """The (block, head) pieces (B, H, n) that hold rows' blocks (B, n) in SDPA's (row, head, position) order."""
        heads = self.k.shape[1]
        return blocks.unsqueeze(1) * heads + torch.arange(heads, device=blocks.device).view(1, heads, 1)

    @property
    def attend_dtype(self) -> torch.dtype:
        """The dtype decoding attends in (paged_attention.py): the pool's own."""
        return self.k.dtype

    def gather(self, pieces: torch.Tensor, bsz: int, window: int, reuse: bool = False,
               dtype: Optional[torch.dtype] = None):
        """Keys and values of `pieces` (a flat `index`, B x H x n) as (B, H, window, D): one index_select per
        tensor lands them in SDPA's layout with no second copy. reuse: gather into the model's scratch buffers
        (valid until the next reuse=True read of any of its layers): a fresh tensor of 100 MB per step and layer
        is mapped and zeroed page by page by the allocator, which cost more than the gather itself."""
        heads, size, dim = self.k.shape[1:]
        n = pieces.numel() // (bsz * heads)
        if dtype not in (None, self.k.dtype):
            raise ValueError(f"a {self.k.dtype} pool reads as itself, not {dtype}")

        def one(pool: torch.Tensor, name: str) -> torch.Tensor:
            flat = pool.view(-1, size, dim)
            got = torch.index_select(flat, 0, pieces, out=self.scratch.take(name, (pieces.numel(), size, dim), pool))\
                if reusing(self.scratch, reuse) else flat.index_select(0, pieces)
            return got.view(bsz, heads, n * size, dim)[:, :, :window]
        return one(self.k, "k"), one(self.v, "v")

    def read(self, blocks: torch.Tensor, window: int, reuse: bool = False, dtype: Optional[torch.dtype] = None):
        """Keys and values of each row's first `window` positions, its blocks (B, n) gathered whole, as
        (B, H, window, D) in the pool's reading dtype or `dtype` (see `gather`)."""
        return self.gather(self.index(blocks).reshape(-1), blocks.shape[0], window, reuse, dtype)

    def copy_block(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks src[i] into dst[i], every buffer (copy on write of a shared, partly filled block)."""
        for buf in self.buffers():
            buf[dst] = buf[src]


class GatherScratch:
    """Named buffers that the pools' reads gather (and dequantize) into, reused from step to step and shared by
    a model's layers (they attend one after another); each grows by half again when a read needs more."""

    def __init__(self) -> None:
        self.buffers: Dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None
             ) -> torch.Tensor:
        """Buffer `name` as a tensor of `shape`, of `dtype` (default: like's) on like's device."""
        dtype = like.dtype if dtype is None else dtype
        count = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < count or buf.dtype != dtype or buf.device != like.device:
            grown = count if buf is None else max(count, count * 3 // 2)
            self.buffers.pop(name, None)  # (the old buffer goes first)
            buf = self.buffers[name] = torch.empty(grown, dtype=dtype, device=like.device)
        return buf[:count].view(*shape)


def reusing(scratch: Optional[GatherScratch], reuse: bool) -> bool:
    """Whether a read gathers into `scratch` (not while torch.compile traces: it needs fresh tensors)."""
    return reuse and scratch is not None and not torch.compiler.is_compiling()


class BlockTables(nn.Module):
    """Each row's block table (rows, max_blocks), on the model's device; set from the host by `assign`."""

    def __init__(self, rows: int, max_seq_len: int, block_size: int, device) -> None:
        super().__init__()
        self.block_size = block_size
        self.max_blocks = blocks_for(max_seq_len, block_size)
        self.register_buffer("table", torch.zeros((rows, self.max_blocks), dtype=torch.long, device=device),
                             persistent=False)
        self.static = False  # rows mapped to blocks of their own (map_rows), not by an engine

    def assign(self, row: int, first: int, blocks: Sequence[int]) -> None:
        """Row `row`'s entries first.. become `blocks`, and every later entry the null block."""
        end = first + len(blocks)
        self.static = False
        if blocks:
            self.table[row, first:end] = torch.tensor(list(blocks), dtype=torch.long)
        self.table[row, end:] = NULL_BLOCK

    def map_rows(self) -> int:
        """Give row r the consecutive blocks 1 + r * max_blocks.. (a row cache); returns the blocks needed."""
        rows = self.table.shape[0]
        self.table.copy_(1 + torch.arange(rows * self.max_blocks, device=self.table.device).view(rows, -1))
        self.static = True
        return 1 + rows * self.max_blocks

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool positions of each (row, position); a negative position (an idle row) maps to the null block."""
        size = self.block_size
        at = positions.clamp(min=0)
        blocks = self.table[rows, at // size]
        return torch.where(positions < 0, NULL_BLOCK * size, blocks * size + at % size)

    def blocks(self, first: int, bsz: int, window: int) -> torch.Tensor:
        """The blocks (bsz, n) holding rows first..first+bsz-1's positions 0..window-1."""
        return self.table[first:first + bsz, :blocks_for(window, self.block_size)]


@dataclass
class Rows:
    """Tokens (B, S): token (b, s) is row first + b's token at positions[b, s] (-1: an idle row), written at
    pool position slots[b, s]; it sees the row's positions up to its own among the first `window`, read from
    the row's blocks (B, n) (mask (B, S, window))."""

    slots: torch.Tensor
    blocks: torch.Tensor
    window: int
    mask: torch.Tensor
    alone: Optional[List[int]] = None  # deterministic decoding: row b attends by itself over its alone[b] positions
    pieces: Optional[tuple] = None  # a long decode step's pieces, planned once for every layer (paged_attention)

    @classmethod
    def at(cls, tables: BlockTables, positions: torch.Tensor, window: int, first: int = 0) -> "Rows":
        bsz, seqlen = positions.shape
        rows = first + torch.arange(bsz, device=positions.device).unsqueeze(1).expand(bsz, seqlen)
        mask = torch.arange(window, device=positions.device) <= positions.clamp(min=0).unsqueeze(-1)
        return cls(tables.slots(rows, positions), tables.blocks(first, bsz, window), window, mask)


@dataclass
class Packed:
    """A ragged prefill: all prompts concatenated into one row (1, N), written at pool positions `slots`.
    Prompt i attends causally within itself (`segments`: its (start, end) in the row): no padding is computed
    and no mask is materialised."""

    slots: torch.Tensor  # (1, N)
    segments: List[tuple]


def pool_bytes_per_block(n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                         block_size: int = BLOCK_SIZE, kv_dtype: Optional[str] = None) -> int:
    """Bytes one block takes on one process: keys and values of block_size positions in every layer, in the
    model's dtype or, with kv_dtype "int8", as int8 codes and their scales (kv_int8.py)."""
    return 2 * n_layers * kv_heads * block_size * position_bytes(head_dim, dtype, kv_dtype)


def layer_block_bytes(pool: nn.Module) -> int:
    """Bytes one block of a layer's pool (KVPool or kv_int8.KVPoolInt8) takes: every buffer's share."""
    return sum(buf[0].numel() * buf.element_size() for buf in pool.buffers())


def check_gib(gib: Optional[float]) -> Optional[float]:
    """kv_cache_gib: None (the default size) or a positive finite number of GiB; ValueError otherwise."""
    if gib is None:
        return None
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not math.isfinite(gib) or gib <= 0:
        raise ValueError(f"kv_cache_gib must be a positive number of GiB (or None: what fits), got {gib!r}")
    return float(gib)


def pool_blocks(gib: Optional[float], per_block: int, max_batch_size: int, max_seq_len: int,
                device: torch.device, spare: int = 0) -> int:
    """Blocks of the pool (the null block included): `gib` GiB of them, or by default `default_gib`'s size."""
    gib = check_gib(gib)
    if gib is None:
        gib = default_gib(per_block, max_batch_size, max_seq_len, device, spare)
    return max(2, int(gib * 2 ** 30 // per_block))


def default_gib(per_block: int, max_batch_size: int, max_seq_len: int, device: torch.device,
                spare: int = 0, block_size: int = BLOCK_SIZE) -> float:
    """The pool size when none is asked for: what fits beside the weights (on CUDA the free device memory, on a
    CPU the available host memory, less 10% and 1 GiB of headroom), at most what max_batch_size full contexts
    take (more could never be used)."""
    cap = (1 + max_batch_size * blocks_for(max_seq_len, block_size)) * per_block
    free = _free_memory(device)
    if free is None:
        return cap / 2 ** 30
    fits = int(free * 0.9) - 2 ** 30 - spare
    return max(min(cap, fits), 2 * per_block) / 2 ** 30


def _free_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
