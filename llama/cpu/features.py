"""What this CPU is and may use: its model and instruction-set flags, read in this one place.

PyTorch's paths (llama.cpu) and the project's C kernels (llama.cpu.qkernels) both decide from here; the C library
reports only what it was built for and is told, once loaded, which of its instruction sets to run.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import torch

# The flags that decide PyTorch's path, in the order `llama.cpu.describe` reports them.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")
# The flags the C kernels' instruction sets need (llama/cpu/csrc: "avx2" = AVX2 + FMA; "avx512_vnni" = AVX-512 F,
# BW, VL and VNNI; its bfloat16 loop also AVX-512 BF16).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
_VNNI = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: FrozenSet[str]  # those of FLAGS the hardware has and this process may use (emulation lowers them)
    onednn_bf16: bool  # PyTorch's oneDNN has bf16 kernels here (native or converted with AVX-512)
    fbgemm: bool  # PyTorch's fbgemm backend is built in and the CPU runs it (AVX2, FMA, F16C)
    hardware: FrozenSet[str] = frozenset()  # those of KERNEL_FLAGS the hardware has (emulation does not lower them)

    @property
    def native_bf16(self) -> bool:
        """bf16 multiply instructions (AVX-512 BF16 or AMX) that oneDNN may use."""
        return self.onednn_bf16 and bool({"avx512_bf16", "amx_bf16"} & self.flags)


def _proc_cpuinfo() -> Dict[str, str]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def detect(cpuinfo: Optional[Dict[str, str]] = None, capability: Optional[str] = None,
           env: Optional[Dict[str, str]] = None, onednn_bf16: Optional[bool] = None,
           fbgemm_built: Optional[bool] = None) -> CpuInfo:
    """Read the CPU's model and flags (Linux /proc/cpuinfo), lowered to what this process may use.

    Each argument replaces one of the machine's own answers (for tests); by default they are read here."""
    cpuinfo = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    env = dict(os.environ) if env is None else env
    onednn_bf16 = _onednn_bf16() if onednn_bf16 is None else onednn_bf16
    fbgemm_built = _fbgemm_built() if fbgemm_built is None else fbgemm_built
    model = cpuinfo.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    hardware = set(cpuinfo.get("flags", "").split()) & set(FLAGS + KERNEL_FLAGS)
    if not cpuinfo.get("flags"):  # no /proc/cpuinfo: what PyTorch's own dispatch says
        hardware = {"AVX2": {"avx2", "fma", "f16c"},
                    "AVX512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}}.get(capability, set())
    flags = hardware & set(FLAGS)
    if capability != "AVX512":  # ATEN_CPU_CAPABILITY=avx2 (or a CPU without AVX-512)
        flags -= {"avx512f", "avx512_bf16", "amx_bf16"}
    if capability not in ("AVX2", "AVX512"):
        flags -= {"avx2", "fma", "f16c"}
    isa = env.get("ONEDNN_MAX_CPU_ISA", env.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    if isa not in ("ALL", "DEFAULT") and "BF16" not in isa and "AMX" not in isa:
        flags -= {"avx512_bf16", "amx_bf16"}
    return CpuInfo(model=model, flags=frozenset(flags), onednn_bf16=onednn_bf16,
                   fbgemm=fbgemm_built and {"avx2", "fma", "f16c"} <= flags,
                   hardware=frozenset(hardware & set(KERNEL_FLAGS)))


def _onednn_bf16() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fbgemm_built() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.lru_cache(maxsize=1)
def info() -> CpuInfo:
    """This machine's CpuInfo, read once."""
    return detect()


def kernel_isa(cpu: Optional[CpuInfo] = None) -> Tuple[str, bool]:
    """The highest instruction set of the C kernels this CPU runs ("scalar", "avx2" or "avx512_vnni", as
    llama.cpu.qkernels.ISAS names them), and whether it runs their AVX-512 BF16 loop: from the hardware's flags,
    since a test or benchmark may force any set the CPU has, whatever PyTorch's emulation settings."""
    hardware = (info() if cpu is None else cpu).hardware
    if _VNNI <= hardware:
        return "avx512_vnni", "avx512_bf16" in hardware
    return ("avx2" if {"avx2", "fma"} <= hardware else "scalar"), False
