"""bfloat16 matrix products on x86 CPUs through oneDNN, with weights packed once into its blocked layout.

At one or a few tokens per step (decoding), PyTorch's eager bfloat16 matrix-vector product reads the weights
far below the memory bandwidth. oneDNN's inner product over pre-packed weights uses the AVX-512 BF16
instructions and streams them more than twice as fast (measured on this project's 2-core machine, one thread,
over 1.1B-shape layers: 15.5 GB/s eager, 34.5 GB/s packed); prefill-sized products run at the same speed either
way. The results are those of the same bfloat16 products; only the summation order inside oneDNN may differ.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where packing helps: bfloat16 on a CPU whose oneDNN build has bfloat16 kernels."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported()) and hasattr(ops, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight (out, in) reordered for oneDNN; usable only through `linear(..., packed=True)`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


@torch.library.custom_op("llama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a weight from `pack`. An opaque operator, so torch.compile calls it as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Module):
    """x @ weight.T from the weight's packed copy (the original can then be freed)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("packed", pack(weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed)


def kernel_for(device: torch.device, dtype: torch.dtype) -> Optional[Callable[[torch.Tensor], nn.Module]]:
    """The faster linear kernel for this device and dtype, None where the plain product is the best."""
    return PackedLinear if supported(device, dtype) else None
