"""The seam between the C kernels (llama/cpu/csrc) and Python: the interface checked at load, a clean build with
-Wall -Werror, the cache key, one compile for many processes, and LLAMA_REQUIRE_KERNELS."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, require_kernels
from llama.cpu import features, kernel_build, qkernels
from llama.model import fused_decode


def _compiler() -> str:
    cc = kernel_build.compiler()
    if cc is None:
        require_kernels()  # fails under LLAMA_REQUIRE_KERNELS=1, else skips
    return cc


def test_the_sources_compile_clean_with_wall_werror(tmp_path):
    cc = _compiler()
    out = subprocess.run(kernel_build.command(cc, str(tmp_path / "k.so"), [*kernel_build.CFLAGS, "-Werror"]),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "-Wall" in kernel_build.CFLAGS


def test_the_portable_build_compiles_clean_and_runs(tmp_path):
    """What a CPU other than x86 compiles (-DQK_PORTABLE: the plain C loops only): clean under -Wall -Werror (the
    x86 build once hid a constant the portable code used), and it reports no x86 loops."""
    cc = _compiler()
    lib = tmp_path / "portable.so"
    out = subprocess.run(kernel_build.command(cc, str(lib), [*kernel_build.CFLAGS, "-Werror", "-DQK_PORTABLE"]),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    portable = ctypes.CDLL(str(lib))
    value, names = ctypes.c_int64(), {}
    portable.qk_constant.restype = ctypes.c_char_p
    i = 0
    while (name := portable.qk_constant(ctypes.c_int64(i), ctypes.byref(value))) is not None:
        names[name.decode()] = value.value
        i += 1
    assert names["built.x86"] == 0 and names["abi_version"] == qkernels.ABI_VERSION
    assert portable.qk_set_cpu(1, 0) != 0  # AVX2 refused: this build has none


def test_the_library_reports_what_python_mirrors():
    require_kernels()
    assert qkernels.constant("abi_version") == qkernels.ABI_VERSION
    assert {n: qkernels.constant(f"isa.{n}") for n in qkernels.ISAS} == qkernels.ISAS
    assert qkernels.constant("chunk") == qkernels.CHUNK and qkernels.constant("block") == qkernels.BLOCK
    # decode.c's structures, by size and by every field's offset, against the ctypes mirrors
    fused_decode._check_layout()
    assert qkernels.constant("sizeof.qk_lin_t") == ctypes.sizeof(fused_decode._Linear)
    assert qkernels.constant("qk_model_t.rope") == fused_decode._Model.rope.offset


def test_a_mismatch_is_an_error_that_says_what_differs(monkeypatch):
    require_kernels()

    class Shifted(ctypes.Structure):  # decode.c's qk_lin_t with its two ints swapped for one int64
        _fields_ = [("kind", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                    ("group", ctypes.c_int64), ("w", ctypes.c_void_p), ("rscale", ctypes.c_void_p)]

    with pytest.raises(qkernels.KernelMismatch, match=r"Shifted does not mirror decode.c's qk_lin_t: .*field isa "
                                                      r"at 4 \(Python: missing\)"):
        qkernels.check_struct(Shifted, "qk_lin_t")
    monkeypatch.setitem(qkernels.ISAS, "avx2", 7)
    with pytest.raises(qkernels.KernelMismatch, match=r"isa.avx2 1 \(Python: 7\)"):
        qkernels._check_abi(qkernels._constants)


def test_the_cpu_decides_the_instruction_sets_and_the_library_refuses_others():
    def isa(flags: str):
        return features.kernel_isa(features.detect({"model name": "x", "flags": flags}, "AVX512", {},
                                                   onednn_bf16=False, fbgemm_built=False))

    vnni = "avx2 fma avx512f avx512bw avx512vl avx512_vnni"
    assert isa(vnni + " avx512_bf16") == ("avx512_vnni", True)
    assert isa(vnni) == ("avx512_vnni", False)
    assert isa("avx2 fma avx512f avx512bw avx512_bf16") == ("avx2", False)  # no VL/VNNI: AVX2's kernels
    assert isa("sse4_2") == ("scalar", False)
    # emulation (ATEN_CPU_CAPABILITY) lowers PyTorch's flags, not what the kernels may be forced to run
    lowered = features.detect({"model name": "x", "flags": vnni}, "AVX2", {}, onednn_bf16=False, fbgemm_built=False)
    assert "avx512f" not in lowered.flags and features.kernel_isa(lowered)[0] == "avx512_vnni"
    require_kernels()
    lib = qkernels.load()
    assert lib.qk_set_cpu(9, 0) != 0  # an instruction set this build does not have


def test_the_cache_key_names_the_machine_the_compiler_and_the_flags(monkeypatch):
    cc = _compiler()
    base = kernel_build.key(cc)
    assert kernel_build.key(cc, [*kernel_build.CFLAGS, "-DX"]) != base
    monkeypatch.setattr(kernel_build.platform, "machine", lambda: "aarch64")
    assert kernel_build.key(cc) != base
    monkeypatch.undo()
    monkeypatch.setattr(kernel_build, "_compiler_version", lambda cc: "gcc 99")
    assert kernel_build.key(cc) != base


def _small_build(tmp_path, seconds: float):
    """A library of one small C file, compiled through a compiler that takes `seconds` longer: the build's lock,
    cache and messages are what these tests check, and the real sources' compile (~7 s of CPU) adds nothing."""
    source = tmp_path / "small.c"
    source.write_text("int qk_small(void) { return 1; }\n")
    slow = tmp_path / "slow-cc"
    slow.write_text(f"#!/bin/sh\nsleep {seconds}\nexec {_compiler()} \"$@\"\n")
    slow.chmod(0o755)
    return source, slow


def test_processes_started_at_once_compile_once(tmp_path):
    source, slow = _small_build(tmp_path, 1.0)  # a second's compile: the processes meet at the lock
    cache = tmp_path / "cache"
    # kernel_build is loaded from its file alone (no torch), so the processes reach the lock together.
    code = textwrap.dedent(f"""
        import importlib.util, pathlib
        spec = importlib.util.spec_from_file_location("kb", {str(ROOT / "llama" / "cpu" / "kernel_build.py")!r})
        kb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kb)
        kb.SOURCES = [pathlib.Path({str(source)!r})]
        print(kb.build())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    env["LLAMA_KERNEL_CACHE"], env["CC"] = str(cache), str(slow)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert len({out.strip() for out, _ in results}) == 1
    messages = [line for _, err in results for line in err.splitlines()]
    assert messages == [f"compiling CPU kernels (once, ~{kernel_build.TYPICAL_SECONDS} s)…"]
    assert len(list(cache.glob("*.so"))) == 1


@pytest.mark.parametrize("rank,said", [("0", True), ("3", False)])
def test_only_rank_0_says_it_compiles(tmp_path, monkeypatch, capsys, rank, said):
    _compiler()
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(kernel_build, "_compile", lambda cc, target: target.write_bytes(b""))
    assert kernel_build.build().exists()
    assert ("compiling CPU kernels" in capsys.readouterr().err) == said


@pytest.mark.parametrize("required,outcome", [("1", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_require_kernels_turns_a_skip_into_a_failure(monkeypatch, required, outcome):
    monkeypatch.setattr(qkernels, "_tried", True)  # as after a failed build
    monkeypatch.setattr(qkernels, "_lib", None)
    monkeypatch.setattr(qkernels, "_why", "no C compiler found (set CC, or install gcc or clang)")
    monkeypatch.setenv("LLAMA_REQUIRE_KERNELS", required)
    with pytest.raises(outcome, match="the C kernels could not be built here: no C compiler found"):
        require_kernels()
