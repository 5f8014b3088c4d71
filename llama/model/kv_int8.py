"""The KV cache in 8 bits (`kv_dtype="int8"`): the paged pool of kv_cache.py with int8 keys and values.

Each (position, KV head) vector of head_dim values is stored as int8 codes with one bfloat16 scale, absmax
symmetric: s = bf16(max|x| / 127), q = round(x / s) (ties to even), x ~ q * s. A position costs head_dim + 2
bytes per head instead of 2 * head_dim: 0.52x of bfloat16 at head_dim 64, 0.51x at 128.

Why a scale per position and not one per block: a block's positions arrive one decode step at a time, so a
block-wide scale must grow as they come and re-round the codes already stored. Those codes would then depend on
the order the positions were written in (a re-prefill after preemption, a chunked prefill or a prefix hit writes
the same positions in other groups than decoding did), and a preempted request could no longer continue with the
tokens it would have had. Per-position codes depend on the position's values only, so every path stores the same
bytes; the scale costs 2 bytes per 64 or 128.

Every attention path reads what the pool stores: decoding and chunks gather and dequantize (`read`), the fused C
step dequantizes in its attention loop (cpu/csrc/decode.c), and a ragged prefill, which attends over its own new
keys without reading the pool, attends over their stored values (`write` returns them), so a prompt's logits
are the same whether it was prefilled whole, in chunks or after a prefix hit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .kv_cache import KV_DTYPES, SCALE_DTYPE, GatherScratch, KVPool, check_kv_dtype, position_bytes, reusing  # noqa: F401

QMAX = 127


def quantize(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (same shape) and bfloat16 scales (x.shape[:-1]) of x's last-axis vectors."""
    x32 = x.float()
    scale = (x32.abs().amax(-1) / QMAX).to(SCALE_DTYPE)
    s32 = scale.float()
    safe = torch.where(s32 == 0, torch.ones_like(s32), s32)  # an all-zero vector: codes 0, whatever the scale
    codes = torch.round(x32 / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in `dtype` (the product of a 7-bit code and a bfloat16 scale is exact in float32, so this is
    float32's product rounded once to dtype)."""
    return codes.to(dtype) * scale.to(dtype).unsqueeze(-1)


class KVPoolInt8(KVPool):
    """One layer's keys and values as KVPool lays them out, (blocks, kv_heads, block_size, head_dim), in int8
    codes, with scales (blocks, kv_heads, block_size) beside them; reads give `dtype` (the model's)."""

    def __init__(self, blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 scratch: Optional[GatherScratch] = None) -> None:
        super().__init__(blocks, block_size, n_kv_heads, head_dim, torch.int8, scratch)
        self.dtype = dtype
        shape = (blocks, n_kv_heads, block_size)
        self.register_buffer("k_scale", torch.zeros(shape, dtype=SCALE_DTYPE), persistent=False)
        self.register_buffer("v_scale", torch.zeros(shape, dtype=SCALE_DTYPE), persistent=False)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: bool = True
              ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Store k, v (..., H, D) quantized at flat pool positions `slots` (both quantized in one pass); with
        `stored`, returns what was stored, dequantized (k and v as every later read sees them)."""
        heads, dim = k.shape[-2:]
        flat = slots.reshape(-1)
        block, offset = flat // self.block_size, flat % self.block_size
        codes, scale = quantize(torch.stack([k, v]))
        for at, (codes_pool, scale_pool) in enumerate(((self.k, self.k_scale), (self.v, self.v_scale))):
            codes_pool[block, :, offset] = codes[at].reshape(-1, heads, dim)
            scale_pool[block, :, offset] = scale[at].reshape(-1, heads)
        if not stored:
            return None
        both = dequantize(codes, scale, k.dtype)
        return both[0], both[1]

    def gather_codes(self, pieces: torch.Tensor, reuse: bool = False):
        """The codes (count, size, D) int8 and scales (count, size) bfloat16 of `pieces` (a flat `index`), for
        keys and for values: ((k codes, k scales), (v codes, v scales)), into the scratch buffers with `reuse`."""
        size, dim = self.k.shape[2:]
        count = pieces.numel()
        scratch = self.scratch if reusing(self.scratch, reuse) else None

        def one(codes: torch.Tensor, scale: torch.Tensor, name: str):
            out_c = None if scratch is None else scratch.take(name + "8", (count, size, dim), codes)
            out_s = None if scratch is None else scratch.take(name + "s", (count, size), scale)
            return (torch.index_select(codes.view(-1, size, dim), 0, pieces, out=out_c),
                    torch.index_select(scale.view(-1, size), 0, pieces, out=out_s))
        return one(self.k, self.k_scale, "k"), one(self.v, self.v_scale, "v")

    def gather(self, pieces: torch.Tensor, bsz: int, window: int, reuse: bool = False,
               dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `pieces` (a flat `index`, B x H x n), dequantized, as (B, H, window, D) in `dtype`
        (default: the model's): the codes and scales gathered in SDPA's layout, then codes * scale written into
        the scratch buffers with `reuse`, the same numbers as `dequantize`. In float32 (what decoding attends in,
        `attend_dtype`) the product is exact and is computed as a conversion and an in-place scaling: a mixed
        int8 x bfloat16 multiplication, or any bfloat16 result, costs 3-8x more per element on a CPU."""
        heads, size, dim = self.k.shape[1:]
        n, dtype = pieces.numel() // (bsz * heads), dtype or self.dtype
        out = []
        for name, (codes, scale) in zip("kv", self.gather_codes(pieces, reuse)):
            buf = self._scratch(name + "-" + str(dtype), codes, dtype, reuse)
            if dtype == torch.float32:
                got = buf.copy_(codes).mul_(scale.float().unsqueeze(-1))
            else:
                got = torch.mul(codes, scale.to(dtype).unsqueeze(-1), out=buf)
            out.append(got.view(bsz, heads, n * size, dim)[:, :, :window])
        return out[0], out[1]

    @property
    def attend_dtype(self) -> torch.dtype:
        """The dtype decoding attends in: float32 (the stored values exactly, and faster to produce)."""
        return torch.float32

    def _scratch(self, name: str, like: torch.Tensor, dtype: torch.dtype, reuse: bool) -> torch.Tensor:
        if reusing(self.scratch, reuse):
            return self.scratch.take(name, like.shape, like, dtype)
        return torch.empty(like.shape, dtype=dtype, device=like.device)
