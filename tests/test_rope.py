"""Rotary embeddings: the fast eager form gives exactly the bits of the plain real form (torch.compile's)."""

from __future__ import annotations

import torch


def test_rope_complex_form_equals_the_real_form_bit_for_bit():
    """apply_rope's eager (complex) form against its compiled (real) form, on fused-projection layouts."""
    from llama.model import apply_rope, rope_tables

    table = rope_tables(64, 40, 10000.0)[torch.arange(40)].unsqueeze(0)
    for dtype in (torch.float32, torch.bfloat16):
        fused = torch.randn(1, 40, 8 * 64 + 2 * 64 * 2, dtype=dtype)  # q | k | v columns, as the fused product
        q = fused[..., : 8 * 64].view(1, 40, 8, 64)
        k = fused[..., 8 * 64: 10 * 64].view(1, 40, 2, 64)
        for x in (q, k):
            pairs = x.float().unflatten(-1, (-1, 2))
            cos, sin = table[..., 0].unsqueeze(2), table[..., 1].unsqueeze(2)
            real = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                                pairs[..., 0] * sin + pairs[..., 1] * cos], -1).flatten(-2).type_as(x)
            assert torch.equal(apply_rope(x, table), real)
