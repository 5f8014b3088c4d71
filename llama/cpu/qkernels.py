"""The project's own CPU kernels (llama/cpu/csrc): built at first use, called through ctypes.

- qlinear.c (with qlinear.h, qint8.c, qint4.c, qgemm.c, qdequant.c): quantized (int8, int4) linear layers at
  decoding sizes, the int8 GEMM and dequantized rows for prefill;
- linear16.c: bfloat16 linear layers at decoding sizes with AVX-512 BF16 or AVX2 (llama.cpu's `own-bf16` path);
- decode.c (with decode.h, decode_ops.c, attention.c): a decoding step's layers in one call over those kernels
  (llama/model/fused_decode.py); lora.c: LoRA adapters inside it;
- pool.c, common.h: the threads they share, the instruction sets, bfloat16 conversions.

Why a C file of its own: at batch 1 PyTorch's weight-only int8 and int4 CPU operators stream the weights at about
half the memory bandwidth (README, "Quantization"), and torchao and Inductor's templates do no better. The C
kernels quantize each row of activations to 8 bits per block of 32 inputs and take integer dot products with
the weights (AVX-512 VNNI, AVX2, or portable C), as llama.cpp does.

How it is built: the plain C source (no Python or PyTorch headers) is compiled by the system's C compiler the
first time a process needs it, once per machine, compiler and source, under a file lock (llama/cpu/kernel_build.py).
One binary serves every x86 CPU: each instruction set's kernel is compiled for it alone, and llama.cpu.features
tells the library at load which of them this CPU runs. At load the library's interface (its version, numbers,
limits and structure layouts) is checked against this side: a mismatch raises KernelMismatch. Where no
compiler is found or the build fails, `load()` returns None, `unavailable()` says why, and the quantized layers
use PyTorch's operators instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from typing import Dict, Iterator, Optional, Type

import torch

from .features import kernel_isa
from .kernel_build import CFLAGS, CSRC, HEADERS, SOURCES, build  # noqa: F401  (the build's public names)

# The interface this module and llama/model/fused_decode.py call: checked at load against what the library
# reports (csrc/common.h's QK_ABI_VERSION, the constants of each C file), so an edit to one side only is an error
# that says what differs, not a crash.
ABI_VERSION = 5
# The instruction sets of the kernels, by the number the C library uses; "best" = the highest this CPU runs.
ISAS = {"scalar": 0, "avx2": 1, "avx512_vnni": 2}
KINDS = {"int8": 8, "int4": 4, "bf16": 16}  # a linear layer's kind, as qk_linear and decode.c number them
CHUNK = 64  # input features per kernel chunk: the kernels take K a multiple of this
BLOCK = 32  # inputs per activation scale


class KernelMismatch(RuntimeError):
    """The compiled library does not match the Python side (an edit to one of them only)."""


_lib: Optional[ctypes.CDLL] = None
_why: Optional[str] = None
_tried = False
_constants: Dict[str, int] = {}
_best: Optional[str] = None
_bf16 = False


_STEP = threading.local()  # the kernels' thread count inside `decoding_threads` (this thread only)


def kernel_threads() -> int:
    """The threads the kernels run on: PyTorch's count, or inside `decoding_threads` the count before it."""
    return getattr(_STEP, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def decoding_threads() -> Iterator[None]:
    """Within: PyTorch's own operators run on one thread and these kernels on all of PyTorch's threads.

    A decoding step's other operators (norms, rotations, attention over a short context) take microseconds each;
    spread over threads that wait passively (llama/__init__.py), each pays for waking them, and they compete for
    the cores with the kernels' pool, whose threads keep polling between calls. Measured at 1.1B, int8, 2
    threads: 10.2 ms of such work per token on 2 threads, 6.5 ms on one."""
    threads = torch.get_num_threads()
    if threads == 1 or getattr(_STEP, "threads", None):
        yield
        return
    _STEP.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _STEP.threads = None


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qk_constant.restype = ctypes.c_char_p
    lib.qk_constant.argtypes = [i64, ctypes.POINTER(i64)]
    lib.qk_set_cpu.restype = c_int
    lib.qk_set_cpu.argtypes = [c_int, c_int]
    lib.qk_packed_bytes.restype = i64
    lib.qk_packed_bytes.argtypes = [c_int, i64, i64, i64]
    lib.qk_pack_int8.restype = c_int
    lib.qk_pack_int8.argtypes = [ptr, ptr, i64, i64]
    lib.qk_pack_int4.restype = c_int
    lib.qk_pack_int4.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.qk_linear.restype = c_int
    lib.qk_lora_add.restype = c_int
    lib.qk_lora_add.argtypes = [ptr, i64, c_int, c_int, c_int, ptr, i64, ptr, i64]
    lib.qk_linear.argtypes = [c_int, c_int, c_int, ptr, c_int, i64, i64, ptr, ptr, i64, i64, ptr, c_int]
    lib.qk_dequantize.restype = c_int
    lib.qk_dequantize.argtypes = [c_int, c_int, c_int, ptr, ptr, i64, i64, i64, i64, ptr, c_int]
    lib.qk_gemm_quantized.restype = c_int
    lib.qk_gemm_quantized.argtypes = [c_int, c_int, ptr, i64, i64, ptr, ptr, i64, i64, ptr]
    lib.qk_packed_bf16_bytes.restype = i64
    lib.qk_packed_bf16_bytes.argtypes = [i64, i64]
    lib.qk_pack_bf16.restype = c_int
    lib.qk_pack_bf16.argtypes = [ptr, ptr, i64, i64]
    lib.qk_linear_bf16.restype = c_int
    lib.qk_linear_bf16.argtypes = [c_int, c_int, ptr, i64, i64, ptr, i64, ptr]
    lib.qk_bf16_isa.restype = c_int
    lib.qk_bf16_isa.argtypes = [c_int]
    lib.qk_untile_bf16.restype = c_int
    lib.qk_untile_bf16.argtypes = [c_int, ptr, i64, i64, i64, ptr]
    lib.qk_read.restype = ctypes.c_uint64
    lib.qk_read.argtypes = [c_int, ptr, i64]
    lib.qk_decode_layers.restype = c_int
    lib.qk_decode_layers.argtypes = [c_int, c_int, ptr, ptr, i64, i64, ptr, ptr]


def _read_constants(lib: ctypes.CDLL) -> Dict[str, int]:
    constants, value, i = {}, ctypes.c_int64(), 0
    while (name := lib.qk_constant(i, ctypes.byref(value))) is not None:
        constants[name.decode()] = value.value
        i += 1
    return constants


def _check_abi(constants: Dict[str, int]) -> None:
    expected = {"abi_version": ABI_VERSION, "chunk": CHUNK, "block": BLOCK,
                **{f"isa.{name}": number for name, number in ISAS.items()},
                **{f"kind.{name}": number for name, number in KINDS.items()}}
    wrong = [f"{name} {constants.get(name, 'missing')} (Python: {want})" for name, want in expected.items()
             if constants.get(name) != want]
    if wrong:
        raise KernelMismatch(f"llama/cpu/csrc and llama/cpu/qkernels.py disagree: {'; '.join(wrong)}")


def _start(lib: ctypes.CDLL) -> None:
    """Check the library against this side, then tell it which instruction sets this CPU runs (llama.cpu.features
    decides; the library only reports what it was built for)."""
    global _constants, _best, _bf16
    _constants = _read_constants(lib)
    _check_abi(_constants)
    isa, bf16 = kernel_isa() if _constants.get("built.x86") else ("scalar", False)
    if lib.qk_set_cpu(ISAS[isa], int(bf16)):
        raise KernelMismatch(f"the C kernels were not built for {isa} (bf16: {bf16})")
    _best, _bf16 = isa, bf16


def load() -> Optional[ctypes.CDLL]:
    """The kernels' library, built on first use; None where it cannot be built or loaded (see `unavailable`).
    Raises KernelMismatch where the library and this module disagree on the interface."""
    global _lib, _why, _tried
    if not _tried:
        _tried = True
        if os.environ.get("LLAMA_KERNELS", "").lower() in ("0", "off", "torch"):
            _why = "LLAMA_KERNELS=" + os.environ["LLAMA_KERNELS"]
        else:
            try:
                lib = ctypes.CDLL(str(build()))
                _declare(lib)
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _why = str(err)
            else:
                _start(lib)
                _lib = lib
    return _lib


def unavailable() -> Optional[str]:
    """Why the C kernels cannot run here (None when they can)."""
    load()
    return _why


def best_isa() -> Optional[str]:
    """The highest instruction set of the C kernels this CPU runs, None without the library."""
    return _best if load() is not None else None


def constant(name: str) -> int:
    """A number the C library reports (its limits: "max_head_dim", "lanes", ...; structure sizes and offsets:
    "sizeof.qk_lin_t", "qk_lin_t.n"). Needs the library loaded; KeyError for a name it does not report."""
    if load() is None:
        raise RuntimeError(f"the C kernels are not available ({_why})")
    return _constants[name]


def check_struct(struct: Type[ctypes.Structure], name: str) -> None:
    """Raise KernelMismatch unless the ctypes `struct` has the C structure `name`'s size and the offset of every
    field the library reports."""
    wrong = []
    if ctypes.sizeof(struct) != constant(f"sizeof.{name}"):
        wrong.append(f"size {constant(f'sizeof.{name}')} (Python: {ctypes.sizeof(struct)})")
    for key, offset in _constants.items():
        field = key.partition(f"{name}.")[2] if key.startswith(f"{name}.") else None
        if field is not None and getattr(getattr(struct, field, None), "offset", None) != offset:
            have = getattr(getattr(struct, field, None), "offset", "missing")
            wrong.append(f"field {field} at {offset} (Python: {have})")
    if wrong:
        raise KernelMismatch(f"{struct.__name__} does not mirror decode.c's {name}: {'; '.join(wrong)}")


def _check(code: int, what: str) -> None:
    if code:
        raise ValueError(f"{what}: the C kernel refused its arguments (error {code})")


def packed_bytes(kind: int, n: int, k: int, group: int = 0) -> int:
    """Bytes of the packed form of an (n, k) weight; -1 for a shape the kernels do not take (k not a multiple of
    64, a group size other than 32, 64, 128 or 256, or one that does not divide k)."""
    return int(load().qk_packed_bytes(kind, n, k, group))


def pack_int8(qweight: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) in the kernels' tiled layout (uint8, flat)."""
    src = qweight.contiguous()
    n, k = src.shape
    out = torch.empty(packed_bytes(8, n, k), dtype=torch.uint8)
    _check(load().qk_pack_int8(src.data_ptr(), out.data_ptr(), n, k), "qk_pack_int8")
    return out


def pack_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The checkpoint's int4 codes (N, K/2 bytes, even input in the high nibble) with their bfloat16 scales and
    zeros (N, K/group) in the kernels' tiled layout (uint8, flat)."""
    codes = packed.contiguous()
    s, z = scales.to(torch.bfloat16).contiguous(), zeros.to(torch.bfloat16).contiguous()
    n, k = codes.shape[0], codes.shape[1] * 2
    out = torch.empty(packed_bytes(4, n, k, group), dtype=torch.uint8)
    _check(load().qk_pack_int4(codes.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), n, k, group),
           "qk_pack_int4")
    return out


def linear(x: torch.Tensor, kind: int, packed: torch.Tensor, rscale: Optional[torch.Tensor], n: int, group: int,
           isa: str, threads: Optional[int] = None) -> torch.Tensor:
    """y = x @ W.T for x (M, K) contiguous bfloat16 or float32, the result in x's dtype. `packed` from
    `pack_int8` (then `rscale`: the float32 row scales) or `pack_int4` (`group`: its group size)."""
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    _check(load().qk_linear(kind, ISAS[isa], threads or kernel_threads(), x.data_ptr(), bf16, m, k,
                            packed.data_ptr(), None if rscale is None else rscale.data_ptr(), n, group,
                            out.data_ptr(), bf16), "qk_linear")
    return out


def dequantize(kind: int, packed: torch.Tensor, rscale: Optional[torch.Tensor], k: int, group: int, rows: slice,
               dtype: torch.dtype, isa: str, threads: Optional[int] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows `rows` of the packed weight as floats (bfloat16 or float32), arguments as `linear`'s; into `out`
    (contiguous, of that many elements or more) when given."""
    count = (rows.stop - rows.start) * k
    if out is None:
        out = torch.empty(count, dtype=dtype)
    if out.dtype != dtype or out.numel() < count or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {count} elements or more")
    _check(load().qk_dequantize(kind, ISAS[isa], threads or kernel_threads(), packed.data_ptr(),
                                None if rscale is None else rscale.data_ptr(), k, group, rows.start, rows.stop,
                                out.data_ptr(), int(dtype == torch.bfloat16)), "qk_dequantize")
    return out.view(-1)[:count].view(rows.stop - rows.start, k)


def gemm_quantized(x: torch.Tensor, kind: int, packed: torch.Tensor, rscale: Optional[torch.Tensor], n: int,
                   group: int, threads: Optional[int] = None) -> torch.Tensor:
    """y = x @ W.T for x (M, K) contiguous bfloat16, arguments as `linear`'s, through the AVX2 float GEMM of the
    bfloat16 kernel (linear16.c) on panels of the dequantized weight: prefill-sized products on AVX2 CPUs."""
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    _check(load().qk_gemm_quantized(kind, threads or kernel_threads(), x.data_ptr(), m, k, packed.data_ptr(),
                                    None if rscale is None else rscale.data_ptr(), n, group, out.data_ptr()),
           "qk_gemm_quantized")
    return out


def read(x: torch.Tensor, threads: Optional[int] = None) -> int:
    """Read every byte of `x` (contiguous, on the CPU) once, split between the kernels' threads with the widest
    loads this CPU has (pool.c): the benchmarks' yardstick of memory bandwidth. Returns the XOR of its 64-bit
    words (which keeps the reads from being optimized away)."""
    if not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError("read() takes a contiguous CPU tensor")
    return int(load().qk_read(threads or kernel_threads(), x.data_ptr(), x.numel() * x.element_size()))


# --- bfloat16 (linear16.c) ---------------------------------------------------------------------------------


def has_avx512_bf16() -> bool:
    """Whether the bfloat16 kernel runs its AVX-512 BF16 loop here (else the portable C loop, for tests only)."""
    return load() is not None and _bf16


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A bfloat16 weight (N, K), K a multiple of 32, in the kernel's tiled layout (bfloat16, flat)."""
    src = weight.to(torch.bfloat16).contiguous()
    n, k = src.shape
    size = int(load().qk_packed_bf16_bytes(n, k))
    if size < 0:
        raise ValueError(f"a bfloat16 weight of shape {tuple(src.shape)}: its inputs must be a multiple of 32")
    out = torch.empty(size // 2, dtype=torch.bfloat16)
    _check(load().qk_pack_bf16(src.data_ptr(), out.data_ptr(), n, k), "qk_pack_bf16")
    return out


def bf16_isa(isa: str = "avx512_vnni") -> str:
    """The loop `linear_bf16` runs with `isa` as its ceiling: "avx512_vnni" (AVX-512 BF16's `vdpbf16ps`, where the
    CPU has it), "avx2" (shift-converted weights and FMA) or "scalar"."""
    level = load().qk_bf16_isa(ISAS[isa])
    return next(name for name, number in ISAS.items() if number == level)


def linear_bf16(x: torch.Tensor, packed: torch.Tensor, n: int, threads: Optional[int] = None,
                isa: str = "avx512_vnni") -> torch.Tensor:
    """y = x @ W.T for x (M, K) contiguous bfloat16 and W packed by `pack_bf16`, in bfloat16, with the loop of
    `bf16_isa(isa)`."""
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    _check(load().qk_linear_bf16(ISAS[isa], threads or kernel_threads(), x.data_ptr(), m, k, packed.data_ptr(), n,
                                 out.data_ptr()), "qk_linear_bf16")
    return out


def untile_bf16(packed: torch.Tensor, k: int, rows: slice, out: torch.Tensor,
                threads: Optional[int] = None) -> torch.Tensor:
    """Rows `rows` of a `pack_bf16` weight, row-major, into `out` (contiguous bfloat16, large enough)."""
    count = (rows.stop - rows.start) * k
    if out.dtype != torch.bfloat16 or out.numel() < count or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bfloat16 tensor of {count} elements or more")
    _check(load().qk_untile_bf16(threads or kernel_threads(), packed.data_ptr(), k, rows.start, rows.stop,
                                 out.data_ptr()), "qk_untile_bf16")
    return out.view(-1)[:count].view(rows.stop - rows.start, k)
