"""Many LoRA adapters inside the fused CPU decoding step (llama/cpu/csrc/lora.c, called by decode.c), and the same
C term for one bank on the layers' path (`BankTerm`, bfloat16 on CPUs with AVX2).

The fused step computes each projection's base product on the own kernels; for rows with an adapter, lora.c then
adds x·A·B from the model's banks (llama/model/lora_bank.py), read in place: this module hands it, per layer and
projection, the pointers to each part's stacked A and B, and per step each row's slot. A step with adapter rows so
keeps the fused path instead of falling back to the layers' one. The arithmetic is the banks' own (bfloat16 sums
rounded as PyTorch rounds them), so a row agrees with the layers' path to bfloat16 rounding.
"""

from __future__ import annotations

import ctypes
from typing import List, Optional

import torch

from .. import cpu
from ..cpu import qkernels

# decode.c's layer projections, in lora.c's order (common.h's LORA_QKV ... LORA_W2), as attribute paths.
PROJECTIONS = (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w13"), ("feed_forward", "w2"))
MAX_PARTS = 3


class _Part(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("in", ctypes.c_int64), ("out", ctypes.c_int64),
                ("first", ctypes.c_int64)]


class _Proj(ctypes.Structure):
    _fields_ = [("parts", ctypes.c_int64), ("part", _Part * MAX_PARTS)]


class _Lora(ctypes.Structure):
    _fields_ = [("rank", ctypes.c_int64), ("slots", ctypes.c_int64), ("n_layers", ctypes.c_int64),
                ("row_slot", ctypes.c_void_p), ("projs", ctypes.c_void_p)]


def check_layout() -> None:
    """Raise qkernels.KernelMismatch unless the structures above mirror lora.c's, and its limits these."""
    for struct, name in ((_Part, "qk_lora_part_t"), (_Proj, "qk_lora_proj_t"), (_Lora, "qk_lora_t")):
        qkernels.check_struct(struct, name)
    theirs = (qkernels.constant("lora.max_parts"), qkernels.constant("lora.projs"))
    if theirs != (MAX_PARTS, len(PROJECTIONS)):
        raise qkernels.KernelMismatch(f"lora.c takes {theirs} parts and projections, fused_lora.py "
                                      f"{(MAX_PARTS, len(PROJECTIONS))}")


def why_not(lora_set) -> Optional[str]:
    """Why lora.c cannot add this model's adapters (None when it can)."""
    if lora_set.dtype != torch.bfloat16:
        return "the adapters' banks are not bfloat16"
    if lora_set.rank > qkernels.constant("lora.max_rank"):
        return f"rank {lora_set.rank} over lora.c's {qkernels.constant('lora.max_rank')}"
    return None


class FusedLora:
    """The description of one model's banks that lora.c reads, and the per-step slots of its rows."""

    def __init__(self, model) -> None:
        check_layout()
        self.lora_set = lora_set = model.lora_set
        why = why_not(lora_set)
        if why is not None:
            raise ValueError(f"the fused step cannot add these LoRA adapters: {why}")
        projs: List[_Proj] = []
        for layer in model.layers:
            for parent, name in PROJECTIONS:
                module = getattr(getattr(layer, parent), name)
                bank = module.lora
                parts = [] if bank is None else [
                    _Part(a.data_ptr(), b.data_ptr(), bank.in_features, cols, first)
                    for (_, first, cols), a, b in zip(bank.parts, bank.a, bank.b)]
                if bank is not None and (bank.rank != lora_set.rank or any(
                        not (a.is_contiguous() and b.is_contiguous()) for a, b in zip(bank.a, bank.b))):
                    raise ValueError(f"the LoRA bank of {name} is not as lora.c reads it")
                projs.append(_Proj(len(parts), (_Part * MAX_PARTS)(*parts)))
        self._projs = (_Proj * len(projs))(*projs)
        self.struct = _Lora(lora_set.rank, lora_set.slots, len(model.layers), None,
                            ctypes.addressof(self._projs))
        self._slots = torch.full((0,), -1, dtype=torch.int32)

    def current(self, model) -> bool:
        """Whether this describes the model's banks still (their tensors are filled in place; only a new
        lora_bank.attach replaces them, with a new set)."""
        return model.lora_set is self.lora_set

    def for_step(self, rows: int) -> Optional[int]:
        """The address of the structure for a step of `rows` rows (None: no row has an adapter), from the
        selection of the call in progress (one slot per token: one token per row in a decoding step)."""
        sel = self.lora_set.selection
        if sel is None:
            return None
        if sel.slot_ids is None or sel.slot_ids.shape[0] != rows:
            raise ValueError(f"the LoRA selection names {len(sel.slots)} tokens for a step of {rows} rows")
        self._slots = sel.slot_ids  # kept alive while decode.c reads it
        self.struct.row_slot = self._slots.data_ptr()
        return ctypes.addressof(self.struct)


class BankTerm:
    """lora.c's term for one LoraBank on the layers' path: y += each token's x·A·B in one C call, grouped by
    slot, instead of PyTorch's masked products over every slot in use (which compute each token's term once
    per slot: 4x the arithmetic over 4 adapters, and 5 operators per part)."""

    def __init__(self, bank) -> None:
        check_layout()
        parts = [_Part(a.data_ptr(), b.data_ptr(), bank.in_features, cols, first)
                 for (_, first, cols), a, b in zip(bank.parts, bank.a, bank.b)]
        self._proj = (_Proj * 1)(_Proj(len(parts), (_Part * MAX_PARTS)(*parts)))
        self.struct = _Lora(bank.rank, bank.a[0].shape[1], 1, None, ctypes.addressof(self._proj))
        self.lib, self.isa = qkernels.load(), qkernels.ISAS[cpu.quantized_isa()]
        self.width = bank.out_features

    @staticmethod
    def serves(bank) -> bool:
        """Whether the C term can stand in for the bank's PyTorch products: a bfloat16 bank on a CPU where the
        kernels run with AVX2 or better, of at most lora.c's rank and parts."""
        return bank.a[0].device.type == "cpu" and bank.a[0].dtype == torch.bfloat16 and len(bank.parts) <= \
            MAX_PARTS and cpu.quantized_isa() is not None and bank.rank <= qkernels.constant("lora.max_rank") \
            and all(a.is_contiguous() and b.is_contiguous() for a, b in zip(bank.a, bank.b))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> bool:
        """Add the term into y (T, width) for x (T, in), slots (T,) int32; False (nothing done) where the
        tensors are not as lora.c reads them (the caller then computes it itself)."""
        if x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16 or not (x.is_contiguous() and y.is_contiguous()) \
                or y.shape[-1] != self.width or slots.shape[0] != x.shape[0]:
            return False
        self.struct.row_slot = slots.data_ptr()
        code = self.lib.qk_lora_add(ctypes.byref(self.struct), 0, 0, qkernels.kernel_threads(), self.isa,
                                    x.data_ptr(), x.shape[0], y.data_ptr(), self.width)
        if code:
            raise ValueError(f"lora.c refused the adapter term (error {code}) for {x.shape[0]} tokens")
        return True
