"""What this CPU can do, chosen at run time: the dtype `dtype=None` means, and the kernel for the linear layers.

Batch-1 decoding streams every weight once per token, so it runs at the speed at which a kernel turns stored
weights into sums. Measured on 2 cores, 1.1B layer shapes (README, "Performance"), three CPU kinds:

- AVX-512 with BF16 (or AMX): oneDNN's inner product over weights packed once in its blocked layout runs the
  native bf16 instructions: `onednn-bf16` (2.7x transformers' decode there). At batch 1 it streams the weights
  at about 55% of the read bandwidth; the project's own kernel (llama/cpu/csrc/linear16.c, `vdpbf16ps` over weights
  tiled for one sequential stream) at about 93%. It cannot share oneDNN's layout, and above 2 rows it is slower
  (1.3-1.5x at 4-16 rows, and a 256-token prefill unpacks row blocks for oneDNN: about 1.25x). So a model built
  for at most OWN_BF16_MAX_BATCH rows (`max_batch_size`, as chat.py and single-prompt generation do) takes
  `own-bf16`, and a batched one (the server) keeps `onednn-bf16`.
- AVX2, or AVX-512 without BF16: PyTorch's own bf16 kernels convert element by element (about 16 GB/s of
  weights, and about 22 GFLOP/s for a 256-token prefill, a tenth of float32). The own kernel's AVX2 loop
  (`own-bf16` with isa "avx2") turns each bf16 weight into a float by a shift or a mask and streams the same
  tiles with FMA, a register-blocked GEMM of its own from 16 rows: the default (`own_bf16_on_avx2`: measured
  ahead of fbgemm at decoding on a quiet machine, 2026-12-07; decoding runs in the fused C step). fbgemm's fp16
  GEMM keeps 16-bit weights and computes in float32 with F16C/FMA (faster prefill: 100 against 74 tok/s at
  1.1B): LLAMA_OWN_BF16_AVX2=0 selects it. `fbgemm-fp16` holds the model's weights as fp16:
  exact for every |w| in [2**-17, 65504] (bf16's 8 significant bits fit fp16's 11); smaller magnitudes round by
  under 2**-25; a matrix with a larger one keeps its plain form (counted as `aten` by `kernel_counts`).
- Anything else (no AVX2, not x86): PyTorch's generic kernels (`aten`); there `dtype=None` is float32.

Emulation is honoured: ATEN_CPU_CAPABILITY lowers the flags, ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 turns
off native bf16, FBGEMM_ENABLE_INSTRUCTIONS / MKL_ENABLE_INSTRUCTIONS pick those libraries' kernels. The
interface: `linear_path(device, dtype)` names the path; `kernel_for(device, dtype)` is what
`Transformer.prepare` takes (weight -> kernel module); `default_dtype(device)`; `dtype_note(device, dtype)`;
`describe(model)`.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import qkernels
from .features import FLAGS, CpuInfo, detect, info, kernel_isa  # noqa: F401  (llama.cpu's names)

OWN_BF16_MAX_BATCH = 2  # the largest max_batch_size for which bfloat16 models take `own-bf16` (see above)
OWN_BF16_PREFILL_ROWS = 32  # from this many rows, `own-bf16` unpacks row blocks for oneDNN
UNPACKED_BLOCK = 2**21  # weights unpacked at a time for such a call (4 MiB of bfloat16)
FP16_MAX = 65504.0


# --- the kernels --------------------------------------------------------------------------------------------


# Each kernel is also registered as an opaque operator, which torch.compile calls as it is; eager code calls the
# function itself and skips the operator dispatch (about 10-25 us a call, 1-2 ms a token at 1.1B).


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@torch.library.custom_op("llama::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a weight reordered by oneDNN."""
    return _onednn_linear(x, weight)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# fbgemm's packed weights are TorchScript objects, which torch.compile cannot take as operator arguments: the
# operator receives integer keys into this table instead, and each entry lives as long as its Fp16Weight.
_FBGEMM_WEIGHTS: Dict[int, Any] = {}
_KEYS = itertools.count()
# fbgemm packs from a float32 copy: packing row blocks of at most this many weights bounds that copy (64 MiB)
# however large the matrix (the output layer, fused products), so loading peaks near one copy of the model.
PACK_BLOCK = 2**24


def _fbgemm_fp16_linear(x: torch.Tensor, keys: List[int]) -> torch.Tensor:
    x32 = x.float()
    if len(keys) == 1:
        return torch.ops.quantized.linear_dynamic_fp16(x32, _FBGEMM_WEIGHTS[keys[0]]).to(x.dtype)
    return torch.cat([torch.ops.quantized.linear_dynamic_fp16(x32, _FBGEMM_WEIGHTS[key]).to(x.dtype)
                      for key in keys], dim=-1)


@torch.library.custom_op("llama::fbgemm_fp16_linear", mutates_args=())
def fbgemm_fp16_linear(x: torch.Tensor, keys: List[int], out_features: int) -> torch.Tensor:
    """x @ weight.T in float32 over the fp16 row blocks stored under `keys`, returned in x's dtype."""
    return _fbgemm_fp16_linear(x, keys)


@fbgemm_fp16_linear.register_fake
def _(x: torch.Tensor, keys: List[int], out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class Fp16Weight:
    """A weight packed by fbgemm as fp16, in row blocks; usable only through Fp16Linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        blocks = -(-weight.numel() // PACK_BLOCK)
        self.keys: List[int] = []
        for block in weight.split(-(-self.out_features // blocks)):
            key = next(_KEYS)
            _FBGEMM_WEIGHTS[key] = torch.ops.quantized.linear_prepack_fp16(block.float(), None)
            self.keys.append(key)
        weakref.finalize(self, _release, list(self.keys))


def _release(keys: List[int]) -> None:
    for key in keys:
        _FBGEMM_WEIGHTS.pop(key, None)


class OneDnnLinear(nn.Module):
    """x @ weight.T from the weight reordered once into oneDNN's blocked layout (native bf16 instructions)."""

    path = "onednn-bf16"
    detail = "oneDNN inner product, weights packed once, native bf16 instructions"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1),
                             persistent=False)

    @staticmethod
    def accepts(weight: torch.Tensor) -> bool:
        return weight.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return onednn_linear(x, self.packed)
        return _onednn_linear(x, self.packed)


class Fp16Linear(nn.Module):
    """x @ weight.T in float32 over the weight held by fbgemm as fp16 (AVX2 + F16C + FMA), in x's dtype."""

    path = "fbgemm-fp16"
    detail = "fbgemm, 16-bit weights held as fp16, float32 compute"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.packed = Fp16Weight(weight)

    @staticmethod
    def accepts(weight: torch.Tensor) -> bool:
        """16-bit weights within fp16's range (a larger one would overflow: that matrix keeps its plain form)."""
        return weight.dtype in (torch.bfloat16, torch.float16) and float(weight.abs().max()) <= FP16_MAX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return fbgemm_fp16_linear(x, self.packed.keys, self.packed.out_features)
        return _fbgemm_fp16_linear(x, self.packed.keys)


_SCRATCH = threading.local()  # each thread's buffer for unpacked row blocks, reused


def _own_bf16_linear(x: torch.Tensor, packed: torch.Tensor, n: int, isa: str = "avx512_vnni") -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    m, k = rows.shape
    if m < OWN_BF16_PREFILL_ROWS or isa != "avx512_vnni":  # (AVX2: the kernel's own GEMM, faster than fbgemm's)
        out = qkernels.linear_bf16(rows, packed, n, isa=isa)
    else:  # compute-bound: oneDNN's GEMM over row blocks unpacked into a reused buffer
        step = min(n, max(64, UNPACKED_BLOCK // k // 64 * 64))
        buf = getattr(_SCRATCH, "buf", None)
        if buf is None or buf.numel() < step * k:
            buf = _SCRATCH.buf = torch.empty(step * k, dtype=torch.bfloat16)
        out = torch.empty(m, n, dtype=torch.bfloat16)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            out[:, lo:hi] = F.linear(rows, qkernels.untile_bf16(packed, k, slice(lo, hi), buf))
    return out.view(*x.shape[:-1], n).to(x.dtype)


@torch.library.custom_op("llama::own_bf16_linear", mutates_args=())
def own_bf16_linear(x: torch.Tensor, packed: torch.Tensor, n: int, isa: str) -> torch.Tensor:
    """x @ weight.T over a weight packed by qkernels.pack_bf16."""
    return _own_bf16_linear(x, packed, n, isa)


@own_bf16_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, n: int, isa: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def own_bf16_on_avx2() -> bool:
    """Whether bfloat16 models take the own kernel's AVX2 loop where there is no AVX-512 BF16 (else fbgemm-fp16):
    the default; LLAMA_OWN_BF16_AVX2=0 selects fbgemm. Measured on 2026-12-07 (Zen 4 emulated as AVX2, 2 threads,
    quiet machine, 3 alternations, 1.1B end to end): decode 13.8 / 14.9 / 17.7 tok/s against fbgemm's 13.5 /
    12.1 / 16.9 (its layers run in the fused C step), prefill 74 against 100 (still ahead of llama.cpp's 67-70)."""
    return os.environ.get("LLAMA_OWN_BF16_AVX2", "") != "0"


def own_bf16_isa(cpu: Optional[CpuInfo] = None) -> Optional[str]:
    """The loop of the own bfloat16 kernel here: "avx512_vnni" (AVX-512 BF16), "avx2" (no bfloat16 instructions,
    or emulation lowered them), None (no AVX2 or no C kernels)."""
    cpu = info() if cpu is None else cpu
    if not {"avx2", "fma"} <= cpu.flags or qkernels.best_isa() not in ("avx2", "avx512_vnni"):
        return None
    return "avx512_vnni" if "avx512_bf16" in cpu.flags and qkernels.has_avx512_bf16() else "avx2"


class OwnBf16Linear(nn.Module):
    """x @ weight.T through the project's bfloat16 kernel (llama/cpu/csrc/linear16.c): with AVX-512 BF16 below
    OWN_BF16_PREFILL_ROWS rows, oneDNN's GEMM over unpacked row blocks above; with AVX2 at every size (its own
    GEMM from 16 rows). `isa`: the kernel's loop (`own_bf16_isa`)."""

    path = "own-bf16"
    detail = "own AVX-512 BF16 or AVX2 kernel over weights tiled once (decoding), the BLAS for prefill"

    def __init__(self, weight: torch.Tensor, isa: Optional[str] = None) -> None:
        super().__init__()
        self.isa = isa or own_bf16_isa() or "scalar"
        self.out_features = weight.shape[0]
        self.register_buffer("packed", qkernels.pack_bf16(weight), persistent=False)

    @staticmethod
    def accepts(weight: torch.Tensor) -> bool:
        return weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] % 32 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return own_bf16_linear(x, self.packed, self.out_features, self.isa)
        return _own_bf16_linear(x, self.packed, self.out_features, self.isa)


KERNELS: Dict[str, Optional[Type[nn.Module]]] = {"own-bf16": OwnBf16Linear, "onednn-bf16": OneDnnLinear,
                                                 "fbgemm-fp16": Fp16Linear, "aten": None}


def linear_path(device: torch.device, dtype: torch.dtype, cpu: Optional[CpuInfo] = None,
                max_batch: Optional[int] = None) -> str:
    """The name of the fastest linear kernel for this device and dtype ("aten": plain F.linear, as off the CPU),
    for a model decoding at most `max_batch` rows at a time (None: any number)."""
    if torch.device(device).type != "cpu":
        return "aten"
    cpu = info() if cpu is None else cpu
    if dtype == torch.bfloat16 and cpu.native_bf16:
        if max_batch is not None and max_batch <= OWN_BF16_MAX_BATCH and "avx512_bf16" in cpu.flags and \
                qkernels.has_avx512_bf16():
            return "own-bf16"
        return "onednn-bf16"
    if dtype == torch.bfloat16 and own_bf16_on_avx2() and own_bf16_isa(cpu) == "avx2":
        return "own-bf16"
    if dtype in (torch.bfloat16, torch.float16) and cpu.fbgemm:
        return "fbgemm-fp16"
    return "aten"


def kernel_for(device: torch.device, dtype: torch.dtype, path: Optional[str] = None, max_batch: Optional[int] = None
               ) -> Optional[Callable[[Union[torch.Tensor, nn.Module]], Optional[nn.Module]]]:
    """What `Transformer.prepare` takes: weight -> the module computing its product on this CPU's path (None
    keeps the weight plain). `path` forces a path by name (benchmarks compare them); None: `linear_path`."""
    kind = KERNELS[path if path is not None else linear_path(device, dtype, max_batch=max_batch)]
    if kind is None:
        return None
    return lambda weight: kind(weight) if isinstance(weight, torch.Tensor) and kind.accepts(weight) else None


def kernel_counts(model: nn.Module) -> Dict[str, int]:
    """How many linear layers of a built model compute through each kernel ("aten": the plain product)."""
    counts: Dict[str, int] = {}
    for module in model.modules():
        if callable(getattr(module, "use_kernel", None)):  # a llama.model.layers.ParallelLinear (no import: the
            kernel = module.kernel                          # model wing uses this one, not the other way)
            name = "aten" if kernel is None else getattr(kernel, "path", type(kernel).__name__)
            counts[name] = counts.get(name, 0) + 1
    return counts


def decodes_on_own_kernels(model: nn.Module) -> bool:
    """Whether every linear layer of a CPU model computes through the project's own kernels (llama/cpu/csrc) at
    decoding sizes: then a decoding step runs inside `qkernels.decoding_threads`."""
    paths = [name for name in kernel_counts(model)]
    return bool(paths) and all(p == OwnBf16Linear.path or p.split("/")[-1] in qkernels.ISAS for p in paths)


def quantized_isa(cpu: Optional[CpuInfo] = None) -> Optional[str]:
    """The instruction set the project's quantized kernels (llama/cpu/csrc/qlinear.c) run with here: "avx512_vnni"
    (AVX-512 with VNNI, as the compiled library reports it, unless emulation lowers AVX-512), "avx2", or None
    where quantized layers use PyTorch's operators instead: no AVX2 (there PyTorch's kernels beat the portable C
    loops), or the library could not be built (said once, on stderr). `LLAMA_KERNELS=torch` forces None."""
    cpu = info() if cpu is None else cpu
    if not {"avx2", "fma"} <= cpu.flags:
        return None
    best = qkernels.best_isa()
    if best is None:
        _note_once(f"note: the quantized CPU kernels could not be built ({qkernels.unavailable()}); quantized "
                   "layers use PyTorch's operators, about half as fast at batch 1")
        return None
    if best == "avx512_vnni" and "avx512f" in cpu.flags:
        return "avx512_vnni"
    return "avx2" if best in ("avx512_vnni", "avx2") else None


def quantized_prefill(isa: Optional[str], cpu: Optional[CpuInfo] = None, kind: str = "int8") -> str:
    """How the project's quantized kernels run prefill-sized products of `kind` ("int8" or "int4") here: "integer"
    (their own kernels, 8-bit activations against the codes) or "dequantized" (the weight dequantized for a float
    GEMM). Integer with AVX-512 VNNI and no AMX: measured 1.47x (int8) and 1.34x (int4) oneDNN's bfloat16
    prefill on a Zen 4, whose VNNI does twice the multiply-adds of its bfloat16 dot products. Integer for int4
    with AVX2 only: its panels' kernel meets 4 activation rows per unpacked code vector (`vpmaddubsw`, 32
    multiply-adds an instruction against an FMA's 8), measured 1.3-2.0x the dequantized panels' float GEMM at
    256 rows (Zen 4 as AVX2, 2026-12-08); int8's AVX2 tiles take one row at a time, so int8 dequantizes there.
    Dequantized with AMX, whose bfloat16 tiles outrun any vector unit."""
    cpu = info() if cpu is None else cpu
    if isa == "avx512_vnni" and "amx_bf16" not in cpu.flags:
        return "integer"
    return "integer" if isa == "avx2" and kind == "int4" else "dequantized"


_NOTED: set = set()


def _note_once(message: str) -> None:
    if message not in _NOTED and not message.startswith("note: the quantized CPU kernels could not be built "
                                                        "(LLAMA_KERNELS="):
        _NOTED.add(message)
        print(message, file=sys.stderr, flush=True)


def default_dtype(device: torch.device, cpu: Optional[CpuInfo] = None) -> torch.dtype:
    """What dtype=None means on a CPU: bfloat16 where a 16-bit path is fast (native bf16, the own AVX2 kernel or
    fbgemm), else float32 (twice the memory, but PyTorch's generic bf16 kernels are slower still)."""
    cpu = info() if cpu is None else cpu
    fast = cpu.native_bf16 or cpu.fbgemm or (own_bf16_on_avx2() and own_bf16_isa(cpu) is not None)
    return torch.bfloat16 if fast else torch.float32


def dtype_note(device: torch.device, dtype: torch.dtype, cpu: Optional[CpuInfo] = None) -> Optional[str]:
    """One line when an explicit dtype is the slow choice on this CPU, else None."""
    if torch.device(device).type != "cpu":
        return None
    cpu = info() if cpu is None else cpu
    name = str(dtype).removeprefix("torch.")
    best = default_dtype(device, cpu)
    if dtype != torch.float32 and linear_path(device, dtype, cpu) == "aten":
        return (f"note: {name} has no fast kernels on this CPU (needs AVX2+F16C with fbgemm, or AVX-512 BF16): "
                f"float32 runs faster, with twice the memory")
    if dtype == torch.float32 and best != torch.float32:
        return (f"note: float32 reads twice the bytes of {str(best).removeprefix('torch.')} per decoded token; "
                f"dtype=None picks {str(best).removeprefix('torch.')} ({linear_path(device, best, cpu)}) here")
    return None


def wait_policy() -> str:
    """How idle OpenMP threads wait, as the environment set it before torch loaded."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    return policy.lower() if policy else "spin (OMP_WAIT_POLICY unset)"


def describe(model: Optional[nn.Module] = None, cpu: Optional[CpuInfo] = None) -> str:
    """One line: the CPU model, the flags that decided, the kernels the model's linear layers run (counted from
    the model, not from what was asked for) and the threads."""
    cpu = info() if cpu is None else cpu
    flags = " ".join(f if f in cpu.flags else f"-{f}" for f in FLAGS)
    line = f"cpu: {cpu.model}; {flags}; aten {torch.backends.cpu.get_cpu_capability()}"
    if model is not None:
        counts = kernel_counts(model)
        line += "; linear layers: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        prefill = sorted({m.prefill for m in model.modules() if isinstance(getattr(m, "prefill", None), str)})
        if prefill:  # the quantized kernels' (llama.quant.kernels._OwnKernel)
            line += f"; quantized prefill {', '.join(prefill)}"
        own = sorted({m.isa for m in model.modules() if isinstance(m, OwnBf16Linear)})
        if own:
            line += "; own-bf16 " + ", ".join("vdpbf16ps, oneDNN from 32 rows" if isa == "avx512_vnni" else
                                              f"{isa} (LLAMA_OWN_BF16_AVX2=0: fbgemm)" for isa in own)
    threads = torch.get_num_threads()
    return line + f"; {threads} thread{'' if threads == 1 else 's'}, OpenMP wait {wait_policy()}"


__all__ = ["CpuInfo", "kernel_isa", "OwnBf16Linear", "OneDnnLinear", "Fp16Linear", "KERNELS", "detect", "info",
           "linear_path", "kernel_for", "decodes_on_own_kernels", "kernel_counts", "quantized_isa",
           "quantized_prefill", "default_dtype", "dtype_note", "describe"]
