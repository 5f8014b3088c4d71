"""Weight-only quantization schemes, one class each, and the registry that turns a user's name into one.

Batch-1 decoding streams every weight once per token, so its speed is the weights' bytes over the memory
bandwidth: int8 halves the bytes of bfloat16 and int4 quarters them. Activations stay in the model's dtype;
only the linear layers' weights are quantized (the embeddings and norms stay as they are).

- `Int8PerRow` ("int8"): w = q * scale, q in [-127, 127], one scale per output row (symmetric).
- `Int4Grouped` ("int4"): w = (q - 8) * scale + zero, q in [0, 15], one scale and zero per `group_size`
  consecutive inputs of a row (asymmetric, the layout of PyTorch's "tinygemm" int4 kernels).

Scales and zeros are rounded to bfloat16 before the weights are quantized against them, so the codes are the
best ones for the scales the kernels actually use, and a quantized checkpoint holds exactly what quantizing at
load computes.

A scheme is a small frozen value (equal schemes compare equal) that says everything the rest of the library
asks of it: how it quantizes a float weight and dequantizes it back, which checkpoint entries it stores and
how each is split across processes, its params.json entry, the kernel module for a device and dtype (and the
packing of the project's C kernels), which devices, dtypes and layer shapes it runs with, and its size. Adding
a scheme is one class here plus its line in `SCHEMES`: nothing else dispatches on a scheme's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
from torch import nn

from ..cpu import qkernels
from .kernels import Int4Linear, Int8Linear
from .weight import STORED_DTYPE, QuantizedWeight, pack_nibbles, unpack_nibbles

_CHUNK_ROWS = 2048  # rows quantized at a time: the float32 temporaries stay small whatever the layer


def _round_stored(x: torch.Tensor) -> torch.Tensor:
    return x.to(STORED_DTYPE).float()


def has_operator(op: str, device_type: str) -> bool:
    """Whether this PyTorch build registers aten `op` for the device (a CPU-only build has no CUDA kernels)."""
    if not hasattr(torch.ops.aten, op):
        return False
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if has_kernel is None:  # cannot ask: the operator exists, and its first call will say the rest
        return True
    try:
        return bool(has_kernel(f"aten::{op}", "CUDA" if device_type == "cuda" else "CPU"))
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Scheme:
    """What every scheme answers. Subclasses set the class attributes and the methods marked so."""

    name: ClassVar[str]  # the user-facing name ("int8"): Llama.build(quantize=...), --quantize, params.json
    options: ClassVar[Tuple[str, ...]] = ()  # its settings beside "mode" in params.json (and as arguments)
    entries: ClassVar[Tuple[str, ...]] = ("weight", "scales")  # a layer's checkpoint entries, <layer>.<entry>
    code_dtype: ClassVar[torch.dtype]  # the dtype of the stored codes (<layer>.weight)
    codes_per_byte: ClassVar[int] = 1  # input features per stored code element
    whole_row_scales: ClassVar[bool] = False  # a row-parallel slice needs its whole row's magnitude (int8)
    own_kind: ClassVar[int]  # the number llama/cpu/csrc/qlinear.c knows this scheme's layout by
    operators: ClassVar[Mapping[str, str]]  # device type -> the aten operator its kernel needs there
    group_size: ClassVar[Optional[int]] = None  # inputs per scale, None for per-row schemes

    # --- naming ------------------------------------------------------------------------------------------------

    @classmethod
    def from_options(cls, group_size: Optional[int] = None) -> "Scheme":
        """The scheme with the user's settings, checked: a ValueError naming a bad one."""
        raise NotImplementedError

    def entry(self) -> Dict[str, Any]:
        """params.json's "quantization" entry."""
        return {"mode": self.name, **{option: getattr(self, option) for option in self.options}}

    @property
    def label(self) -> str:
        """A short name with its settings, for benchmark rows ("int8", "int4_g64")."""
        return self.name

    def describe(self) -> str:
        return self.name

    # --- the math ----------------------------------------------------------------------------------------------

    def quantize(self, weight: torch.Tensor, row_amax: Optional[torch.Tensor] = None) -> QuantizedWeight:
        """The plain quantized form of a float weight (out, in). `row_amax`: each row's largest magnitude when
        the row is longer than `weight` holds (a row-parallel rank's slice), for `whole_row_scales` schemes."""
        raise NotImplementedError

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # --- checkpoints -------------------------------------------------------------------------------------------

    @classmethod
    def entry_split_dim(cls, entry: str, layer_dim: Optional[int], ndim: int) -> Optional[int]:
        """The dim a layer's stored `entry` of `ndim` dims is split on across shards when the layer's weight is
        split on `layer_dim`: every entry keeps output rows on dim 0 and input columns (or groups) on dim 1, so
        it splits like the weight; one with no such dim (a per-row vector of a layer split on its inputs) is
        held whole by every shard."""
        return layer_dim if layer_dim is None or layer_dim < ndim else None

    def take(self, state: Dict[str, torch.Tensor], layer: str, where: str) -> QuantizedWeight:
        """Remove layer `layer`'s entries from a loaded `state`, as one QuantizedWeight."""
        missing = [f"{layer}.{e}" for e in self.entries if f"{layer}.{e}" not in state]
        if missing:
            raise ValueError(f"{where}: {missing[0]} is missing beside {layer}.scales ({self.describe()} stores "
                             f"{', '.join(self.entries)})")
        tensors = [state.pop(f"{layer}.{e}") for e in self.entries]
        return QuantizedWeight(tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None, self)

    def stored_shapes(self, out_features: int, in_features: int) -> Dict[str, Tuple[int, ...]]:
        """Each of a layer's entries' shapes for an (out, in) weight."""
        raise NotImplementedError

    def check_stored(self, weight: QuantizedWeight, shape: Tuple[int, int], name: str, where: str) -> None:
        """A ValueError naming the layer whose stored tensors do not fit an (out, in) = `shape` weight."""
        want = self.stored_shapes(*shape)
        got = {e: tuple(t.shape) for e, t in zip(self.entries, (weight.qweight, weight.scales, weight.zeros))}
        if weight.qweight.dtype != self.code_dtype or got != want:
            raise ValueError(f"{where}: {name} is not a {self.describe()} weight of shape {shape}: "
                             f"{weight.qweight.dtype} {tuple(weight.qweight.shape)}, scales "
                             f"{tuple(weight.scales.shape)}")

    # --- running -----------------------------------------------------------------------------------------------

    def kernel(self, weight: QuantizedWeight, dtype: torch.dtype, isa: Optional[str] = "auto") -> nn.Module:
        """The module computing x @ W.T from `weight` (the project's CPU kernels where they run, else PyTorch's
        operator for the device; `isa` forces one: an instruction set name, or None for PyTorch's)."""
        raise NotImplementedError

    @property
    def own_group(self) -> int:
        """The group size llama/cpu/csrc/qlinear.c is given (0: per-row scales)."""
        return self.group_size or 0

    def own_pack(self, weight: QuantizedWeight) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(packed weight, float32 row scales or None) in the layout of llama/cpu/csrc/qlinear.c."""
        raise NotImplementedError

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """A ValueError naming the device or dtype where this build of PyTorch has no kernel for the scheme."""
        op = self.operators.get(device.type)
        if op is None:
            raise ValueError(f"quantize={self.name!r} runs on {' and '.join(self.operators)} only, not on device "
                             f"{str(device)!r}")
        if not has_operator(op, device.type):
            raise ValueError(f"quantize={self.name!r} needs torch.ops.aten.{op} on {device.type}, which this "
                             f"PyTorch ({torch.__version__}) does not have")
        if device.type == "cpu" and dtype != torch.bfloat16:
            raise ValueError(f"quantize={self.name!r} on a CPU needs dtype bfloat16 (--dtype bfloat16), got {dtype}: "
                             "PyTorch's CPU int8 and int4 kernels are vectorized for bfloat16 activations only "
                             "(with float32 they ran 4 to over 100 times slower than the unquantized model here)")

    def check_shapes(self, shapes: Mapping[str, Tuple[int, int]], world: int, device_type: Optional[str]) -> None:
        """A ValueError when a layer's (out, in) slice on each of `world` processes does not fit the kernels."""

    def layer_bytes(self, out_features: int, in_features: int, dtype: torch.dtype) -> float:
        """Bytes an (out, in) layer's quantized weight takes in memory, its scales (in `dtype`) included."""
        raise NotImplementedError


@dataclass(frozen=True)
class Int8PerRow(Scheme):
    """Symmetric int8, one scale per output row: the largest magnitude of each row maps to 127."""

    name: ClassVar[str] = "int8"
    code_dtype: ClassVar[torch.dtype] = torch.int8
    whole_row_scales: ClassVar[bool] = True
    own_kind: ClassVar[int] = 8
    operators: ClassVar[Mapping[str, str]] = {"cpu": "_weight_int8pack_mm", "cuda": "_weight_int8pack_mm"}

    @classmethod
    def from_options(cls, group_size: Optional[int] = None) -> "Int8PerRow":
        if group_size is not None:
            raise ValueError(f"group_size applies to int4 only (int8 has one scale per output row), got {group_size!r}")
        return cls()

    def quantize(self, weight: torch.Tensor, row_amax: Optional[torch.Tensor] = None) -> QuantizedWeight:
        if row_amax is None:
            row_amax = weight.abs().amax(dim=1)
        scales = _round_stored(row_amax.float().clamp(min=1e-8) / 127)
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        for lo in range(0, weight.shape[0], _CHUNK_ROWS):
            rows = slice(lo, lo + _CHUNK_ROWS)
            q[rows] = torch.round(weight[rows].float() / scales[rows, None]).clamp_(-127, 127)
        return QuantizedWeight(q, scales.to(STORED_DTYPE), None, self)

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return (weight.qweight.float() * weight.scales.float()[:, None]).to(dtype)

    def stored_shapes(self, out_features: int, in_features: int) -> Dict[str, Tuple[int, ...]]:
        return {"weight": (out_features, in_features), "scales": (out_features,)}

    def kernel(self, weight: QuantizedWeight, dtype: torch.dtype, isa: Optional[str] = "auto") -> nn.Module:
        return Int8Linear(weight, dtype, isa)

    def own_pack(self, weight: QuantizedWeight) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n = weight.out_features
        rscale = torch.zeros(-(-n // 4) * 4)  # whole tiles of 4 rows: the padding rows' scales are 0
        rscale[:n] = weight.scales.float()
        return qkernels.pack_int8(weight.qweight), rscale

    def layer_bytes(self, out_features: int, in_features: int, dtype: torch.dtype) -> float:
        return out_features * in_features + out_features * dtype.itemsize


GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class Int4Grouped(Scheme):
    """Asymmetric int4 in groups of `group_size` inputs: each group's minimum and maximum map to codes 0 and 15.
    Two codes per byte, the even input in the high nibble."""

    group_size: int = DEFAULT_GROUP_SIZE
    name: ClassVar[str] = "int4"
    options: ClassVar[Tuple[str, ...]] = ("group_size",)
    entries: ClassVar[Tuple[str, ...]] = ("weight", "scales", "zeros")
    code_dtype: ClassVar[torch.dtype] = torch.uint8
    codes_per_byte: ClassVar[int] = 2
    own_kind: ClassVar[int] = 4
    operators: ClassVar[Mapping[str, str]] = {"cpu": "_weight_int4pack_mm_for_cpu", "cuda": "_weight_int4pack_mm"}

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {list(GROUP_SIZES)} for int4, got {self.group_size!r}")

    @classmethod
    def from_options(cls, group_size: Optional[int] = None) -> "Int4Grouped":
        return cls() if group_size is None else cls(group_size)

    @property
    def label(self) -> str:
        return f"{self.name}_g{self.group_size}"

    def describe(self) -> str:
        return f"{self.name} (groups of {self.group_size})"

    def quantize(self, weight: torch.Tensor, row_amax: Optional[torch.Tensor] = None) -> QuantizedWeight:
        if row_amax is not None:
            raise ValueError("int4 scales belong to groups of inputs, not to whole rows: row_amax does not apply")
        group_size = self.group_size
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide the {in_features} input features")
        groups = in_features // group_size
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
        scales = torch.empty(out_features, groups, dtype=STORED_DTYPE, device=weight.device)
        zeros = torch.empty_like(scales)
        for lo in range(0, out_features, _CHUNK_ROWS):
            rows = slice(lo, lo + _CHUNK_ROWS)
            w = weight[rows].float().reshape(-1, groups, group_size)
            low, high = w.amin(dim=-1), w.amax(dim=-1)
            scale = _round_stored((high - low).clamp(min=1e-8) / 15)
            zero = _round_stored(low + 8 * scale)
            codes = torch.round((w - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp_(0, 15)
            packed[rows] = pack_nibbles(codes.reshape(-1, in_features))
            scales[rows], zeros[rows] = scale, zero
        return QuantizedWeight(packed, scales, zeros, self)

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        n = weight.out_features
        codes = unpack_nibbles(weight.qweight).float().reshape(n, -1, self.group_size)
        w = (codes - 8) * weight.scales.float()[..., None] + weight.zeros.float()[..., None]
        return w.reshape(n, weight.in_features).to(dtype)

    def stored_shapes(self, out_features: int, in_features: int) -> Dict[str, Tuple[int, ...]]:
        groups = (out_features, in_features // self.group_size)
        return {"weight": (out_features, in_features // 2), "scales": groups, "zeros": groups}

    def kernel(self, weight: QuantizedWeight, dtype: torch.dtype, isa: Optional[str] = "auto") -> nn.Module:
        return Int4Linear(weight, dtype, isa)

    def own_pack(self, weight: QuantizedWeight) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return qkernels.pack_int4(weight.qweight, weight.scales, weight.zeros, self.group_size), None

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        super().check_device(device, dtype)
        if device.type == "cuda":
            if dtype != torch.bfloat16:
                raise ValueError(f"quantize='int4' on CUDA needs dtype bfloat16 (its kernel's only one), got {dtype}")
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 0):
                raise ValueError(f"quantize='int4' on CUDA needs compute capability 8.0 or newer (Ampere); "
                                 f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")

    def check_shapes(self, shapes: Mapping[str, Tuple[int, int]], world: int, device_type: Optional[str]) -> None:
        """int4 groups may not straddle two ranks' input features, and the int4 layouts block the output rows
        (16 on CPUs, 8 on CUDA)."""
        bad = {name: k for name, (_, k) in shapes.items() if k % self.group_size}
        if bad:
            valid = [g for g in GROUP_SIZES if all(k % g == 0 for _, k in shapes.values())]
            name, k = next(iter(bad.items()))
            raise ValueError(f"int4 group_size {self.group_size} does not divide the {k} input features of {name} "
                             f"on each of {world} process(es): groups may not be split between processes; valid "
                             f"group sizes here: {valid or 'none'}")
        rows = {"cpu": 16, "cuda": 8}.get(device_type or "", 1)
        odd = [f"{name} ({n})" for name, (n, _) in shapes.items() if n % rows]
        if odd:
            raise ValueError(f"int4 on {device_type} needs each process's output rows in multiples of {rows}: "
                             f"{', '.join(odd[:3])} with {world} process(es)")

    def layer_bytes(self, out_features: int, in_features: int, dtype: torch.dtype) -> float:
        return out_features * in_features * (0.5 + 2 * STORED_DTYPE.itemsize / self.group_size)


# --- the registry ---------------------------------------------------------------------------------------------

SCHEMES: Dict[str, Type[Scheme]] = {scheme.name: scheme for scheme in (Int8PerRow, Int4Grouped)}


def parse(name: Any, group_size: Optional[int] = None) -> Scheme:
    """The scheme a user named ("int8", "int4" with an optional group size, or a Scheme itself): the one place a
    name becomes a scheme. A ValueError names a bad name or setting."""
    if isinstance(name, Scheme):
        if group_size is not None and group_size != name.group_size:
            raise ValueError(f"group_size={group_size!r} contradicts the scheme {name.describe()}")
        return name
    if not isinstance(name, str) or name not in SCHEMES:
        raise ValueError(f"quantize must be one of {list(SCHEMES)} or None, got {name!r}")
    return SCHEMES[name].from_options(group_size)


def from_entry(entry: object, where: str) -> Scheme:
    """The scheme params.json's "quantization" entry names; a ValueError naming a malformed one."""
    options = {option for scheme in SCHEMES.values() for option in scheme.options}
    if not isinstance(entry, dict) or set(entry) - {"mode"} - options or "mode" not in entry:
        raise ValueError(f"{where}: \"quantization\" must be an object with \"mode\" and (int4) \"group_size\", "
                         f"got {entry!r}")
    try:
        return parse(entry["mode"], entry.get("group_size"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
