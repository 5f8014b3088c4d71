"""A quantized linear weight in its plain form: codes, scales (and zeros), with the scheme that made them.

The plain form keeps every tensor's output rows on dim 0 and its input columns (bytes, groups) on dim 1, so it is
sliced across ranks, concatenated by fusion and stored in a checkpoint like any weight. What the tensors mean
(their dtype, how many inputs a byte holds, how to dequantize) is its scheme's (llama/quant/schemes.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .schemes import Scheme

STORED_DTYPE = torch.bfloat16  # scales and zeros, in checkpoints and before the cast to the model's dtype


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, the even input column in the high nibble (the CUDA kernel's input)."""
    codes = codes.to(torch.uint8)
    return (codes[:, ::2] << 4) | codes[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) codes 0..15 as uint8."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


class QuantizedWeight(nn.Module):
    """One linear layer's weight (out, in) in the plain quantized form that checkpoints store.

    `qweight` holds the codes, `scales` (and `zeros`, for schemes that have them) the per-row or per-group
    floats; `scheme` says what they mean. As a module it computes x @ W.T by dequantizing (slowly, but exactly
    the reference the kernels are tested against); the scheme's `kernel` turns it into a fast one. Its buffers
    are not persistent: a model's state dict stays in Meta's names.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 scheme: "Scheme") -> None:
        super().__init__()
        self.scheme = scheme
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("zeros", zeros, persistent=False)

    @property
    def mode(self) -> str:
        """The scheme's user-facing name ("int8", "int4")."""
        return self.scheme.name

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * self.scheme.codes_per_byte

    @property
    def group_size(self) -> Optional[int]:
        return self.scheme.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scheme.dequantize(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def state(self, prefix: str) -> Dict[str, torch.Tensor]:
        """Checkpoint entries `<prefix>.weight`, `.scales` (and `.zeros`)."""
        out = {f"{prefix}.weight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return out

    @classmethod
    def concat(cls, parts: Sequence["QuantizedWeight"]) -> "QuantizedWeight":
        """The weights stacked on the output rows (fused wq/wk/wv, w1/w3): the same as quantizing the stack,
        since every scale belongs to one row."""
        if len({(p.scheme, p.in_features) for p in parts}) != 1:
            raise ValueError("only quantized weights of the same scheme (and group size) and input size can be fused")
        zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros, parts[0].scheme)
