"""The quantized linear layers' kernels: the modules that compute x @ W.T from a packed quantized weight.

On x86 CPUs with AVX2, the library's own (llama/cpu/qkernels.py, llama/cpu/csrc/qlinear.c: 8-bit activations against
the weights in integer dot products; prefill-sized calls too with AVX-512 VNNI, else through a float GEMM on
dequantized tiles: see `cpu.quantized_prefill`); elsewhere
PyTorch's built-in weight-only operators: ``aten._weight_int8pack_mm`` (CPU and CUDA),
``aten._weight_int4pack_mm_for_cpu`` (CPU) and ``aten._weight_int4pack_mm`` (CUDA, bfloat16, compute capability
8.0 or newer). See the README's measurements for why. Which module a weight gets is its scheme's choice
(llama/quant/schemes.py); what the C kernels need of a weight (their kind number, group, packing) too.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu
from ..cpu import qkernels
from .weight import QuantizedWeight, unpack_nibbles

_CHUNK_ROWS = 2048  # rows repacked at a time for PyTorch's CPU int4 layout: the int32 temporaries stay small


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (tokens, features) matrix, the operators' input."""
    return x.reshape(-1, x.shape[-1]).contiguous()


CUDA_INT8_KERNEL_ROWS = 16  # on CUDA, larger calls (prefill) go through the dense product: see Int8Linear
# Where prefill goes through a float GEMM (cpu.quantized_prefill), calls of this many rows or more dequantize the
# weight tile by tile into the dtype of the CPU's fastest float GEMM (oneDNN bfloat16 with native bf16
# instructions or AMX, else MKL float32) instead of running the integer kernels.
CPU_PREFILL_ROWS = 32
DEQUANTIZED_TILE = 2**22  # weights dequantized at a time for such a call (8 MiB in bfloat16)


_SCRATCH = threading.local()  # each thread's buffer for dequantized tiles, reused: fresh pages cost more than the work


def _tile_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def _own_matmul(x: torch.Tensor, packed: torch.Tensor, rscale: Optional[torch.Tensor], n: int, kind: int,
                group: int, isa: str, gemm_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """x (M, K) @ W.T through llama/cpu/csrc/qlinear.c, at every size when `gemm_dtype` is None; else from
    CPU_PREFILL_ROWS rows, tiles of the dequantized weight (in a reused buffer) through F.linear in `gemm_dtype`."""
    if x.dtype not in (torch.bfloat16, torch.float32):  # the C kernels read bfloat16 or float32
        return _own_matmul(x.float(), packed, rscale, n, kind, group, isa, gemm_dtype).to(x.dtype)
    if gemm_dtype is None or x.shape[0] < CPU_PREFILL_ROWS:
        return qkernels.linear(x, kind, packed, rscale, n, group, isa)
    if isa == "avx2" and x.dtype == torch.bfloat16:  # int8: the bfloat16 kernel's AVX2 GEMM on dequantized panels
        return qkernels.gemm_quantized(x, kind, packed, rscale, n, group)
    k = x.shape[1]
    xg = x.to(gemm_dtype)
    step = min(n, max(64, DEQUANTIZED_TILE // k // 64 * 64))
    buf = _tile_buffer(step * k, gemm_dtype)
    out = torch.empty(x.shape[0], n, dtype=gemm_dtype)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        tile = qkernels.dequantize(kind, packed, rscale, k, group, slice(lo, hi), gemm_dtype, isa, out=buf)
        out[:, lo:hi] = F.linear(xg, tile)
    return out.to(x.dtype)


@torch.library.custom_op("llama::quantized_matmul", mutates_args=())
def quantized_matmul(x: torch.Tensor, packed: torch.Tensor, rscale: Optional[torch.Tensor], n: int, kind: int,
                     group: int, isa: str, gemm_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """`_own_matmul` as an opaque operator, which torch.compile calls as it is."""
    return _own_matmul(x, packed, rscale, n, kind, group, isa, gemm_dtype)


@quantized_matmul.register_fake
def _(x, packed, rscale, n, kind, group, isa, gemm_dtype):
    return x.new_empty((x.shape[0], n))


class _OwnKernel(nn.Module):
    """The weight packed for llama/cpu/csrc/qlinear.c (llama.qkernels) and the product through it: 8-bit
    activations per block of 32 inputs against the int8 or int4 weights in integer dot products."""

    def __init__(self, weight: QuantizedWeight, isa: str) -> None:
        super().__init__()
        self.isa, self.n, self.k = isa, weight.out_features, weight.in_features
        self.kind, self.group = weight.scheme.own_kind, weight.scheme.own_group
        packed, rscale = weight.scheme.own_pack(weight)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("rscale", rscale, persistent=False)
        self.prefill = cpu.quantized_prefill(isa, kind="int4" if self.kind == qkernels.KINDS["int4"] else "int8")
        # the float GEMM's dtype for dequantized prefill; None: the integer kernels at every size
        self.gemm_dtype = None if self.prefill == "integer" else \
            torch.bfloat16 if cpu.info().native_bf16 else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.packed, self.rscale, self.n, self.kind, self.group, self.isa, self.gemm_dtype)
        if torch.compiler.is_compiling():
            return quantized_matmul(x, *args)
        return _own_matmul(x, *args)


def own_kernel_isa(weight: QuantizedWeight, dtype: torch.dtype) -> Optional[str]:
    """The instruction set llama/cpu/csrc/qlinear.c runs this weight with here, or None where PyTorch's operator
    serves it instead: off the CPU, activations other than bfloat16 (the library's only quantized CPU dtype; the
    kernels' 8-bit activations would miss the float32 tests' tolerance), a CPU without AVX2 (the portable C
    loops are slower than PyTorch's), no compiler, or a shape the kernels refuse (K not a multiple of 64)."""
    if weight.qweight.device.type != "cpu" or dtype != torch.bfloat16:
        return None
    isa = cpu.quantized_isa()
    if isa is None or qkernels.packed_bytes(weight.scheme.own_kind, weight.out_features, weight.in_features,
                                            weight.scheme.own_group) < 0:
        return None
    return isa


class Int8Linear(nn.Module):
    """x @ W.T for an int8 weight. On CPUs with AVX2 or AVX-512 VNNI (bfloat16 activations): the project's own
    kernels (`_OwnKernel`). Elsewhere ``aten._weight_int8pack_mm``, which reads the int8 rows directly and
    applies each row's scale to the output; on CUDA that operator is a matrix-vector kernel without tensor
    cores, so calls of more than CUDA_INT8_KERNEL_ROWS tokens (prefill, compute-bound) cast the weight to the
    activations' dtype for one dense product instead, scaling its output. `path` names the kernel that runs."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, isa: Optional[str] = "auto") -> None:
        super().__init__()
        isa = own_kernel_isa(weight, dtype) if isa == "auto" else isa
        self.own = _OwnKernel(weight, isa) if isa is not None else None
        self.path = f"Int8Linear/{isa or 'aten'}"
        if self.own is None:
            self.register_buffer("qweight", weight.qweight.contiguous(), persistent=False)
            self.register_buffer("scales", weight.scales.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if self.own is not None:
            out = self.own(rows)
        elif rows.is_cuda and rows.shape[0] > CUDA_INT8_KERNEL_ROWS:
            out = F.linear(rows, self.qweight.to(rows.dtype)) * self.scales
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class Int4Linear(nn.Module):
    """x @ W.T for a groupwise int4 weight. On CPUs with AVX2 or AVX-512 VNNI (bfloat16 activations): the
    project's own kernels (`_OwnKernel`). Elsewhere PyTorch's tinygemm operators: the codes are repacked once
    into the device's blocked layout, with scales and zeros interleaved as (K/group_size, N, 2). `path` names
    the kernel that runs."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, isa: Optional[str] = "auto") -> None:
        super().__init__()
        self.group_size = weight.group_size
        isa = own_kernel_isa(weight, dtype) if isa == "auto" else isa
        self.own = _OwnKernel(weight, isa) if isa is not None else None
        self.path = f"Int4Linear/{isa or 'aten'}"
        if self.own is not None:
            return
        device = weight.qweight.device
        if device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(weight.qweight.contiguous(),
                                                                cuda_inner_k_tiles(weight.in_features))
        else:  # the CPU op takes int32 codes: a few rows at a time (its layout blocks rows by 64), to stay small
            packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_nibbles(weight.qweight[lo:lo + _CHUNK_ROWS]).to(torch.int32), 1)
                for lo in range(0, weight.out_features, _CHUNK_ROWS)])
        self.register_buffer("packed", packed, persistent=False)
        scale_zero = torch.stack([weight.scales, weight.zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
        self.register_buffer("scale_zero", scale_zero, persistent=False)
        self._mm = torch.ops.aten._weight_int4pack_mm if device.type == "cuda" else \
            torch.ops.aten._weight_int4pack_mm_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        out = self.own(rows) if self.own is not None else self._mm(rows, self.packed, self.group_size, self.scale_zero)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def cuda_inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 layout packs 16 * inner_k_tiles inputs per tile: the largest of 8, 4, 2 that divides K."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)

