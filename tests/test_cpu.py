"""llama.cpu: which kernel path and default dtype each kind of CPU gets (with made-up CPUs, so on any machine),
and that each packed path computes what F.linear computes (where this CPU can run it, else skipped)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT
from llama import cpu, qkernels
from llama.model.layers import ColumnParallelLinear

CPU = torch.device("cpu")
AVX2_FLAGS = "fpu sse sse2 avx fma f16c avx2 bmi2"
EPYC_AVX2 = {"model name": "AMD EPYC 7B12", "flags": AVX2_FLAGS}
XEON_AVX512 = {"model name": "Intel(R) Xeon(R) Processor", "flags": AVX2_FLAGS + " avx512f avx512bw avx512_vnni"}
EPYC_BF16 = {"model name": "AMD EPYC 9B14", "flags": AVX2_FLAGS + " avx512f avx512bw avx512_bf16"}
NO_AVX2 = {"model name": "Old x86", "flags": "fpu sse sse2 avx"}
OWN_AVX2 = qkernels.best_isa() in ("avx2", "avx512_vnni")  # the C library runs its AVX2 loop here
# bfloat16 without AVX-512 BF16, by default: the own AVX2 loop where the C library runs it (fbgemm with
# LLAMA_OWN_BF16_AVX2=0)
AVX2_PATH = "own-bf16" if OWN_AVX2 else "fbgemm-fp16"


@pytest.fixture(autouse=True)
def _default_paths(monkeypatch):
    monkeypatch.delenv("LLAMA_OWN_BF16_AVX2", raising=False)  # the paths as shipped, whatever the caller's shell


def detect(cpuinfo, capability="AVX512", env=None, onednn_bf16=True, fbgemm_built=True):
    return cpu.detect(cpuinfo, capability, env or {}, onednn_bf16=onednn_bf16, fbgemm_built=fbgemm_built)


@pytest.mark.parametrize("cpuinfo, capability, path, default", [
    (EPYC_AVX2, "AVX2", AVX2_PATH, torch.bfloat16),
    (XEON_AVX512, "AVX512", AVX2_PATH, torch.bfloat16),  # AVX-512 without BF16: bf16 is converted
    (EPYC_BF16, "AVX512", "onednn-bf16", torch.bfloat16),
    (NO_AVX2, "DEFAULT", "aten", torch.float32),
])
def test_each_cpu_kind_gets_its_path_and_default_dtype(cpuinfo, capability, path, default):
    info = detect(cpuinfo, capability, onednn_bf16="avx512f" in cpuinfo["flags"])
    assert cpu.linear_path(CPU, torch.bfloat16, info) == path
    assert cpu.default_dtype(CPU, info) == default
    assert cpu.linear_path(CPU, torch.float32, info) == "aten"  # float32: MKL's sgemm as it is


def test_emulated_avx2_drops_the_avx512_paths():
    """ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 make a BF16 machine behave as an AVX2 one."""
    assert detect(EPYC_BF16).native_bf16
    assert not detect(EPYC_BF16, capability="AVX2").native_bf16
    info = detect(EPYC_BF16, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert not info.native_bf16 and cpu.linear_path(CPU, torch.bfloat16, info) == AVX2_PATH
    assert cpu.linear_path(CPU, torch.float16, info) == "fbgemm-fp16"
    assert detect(EPYC_BF16, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).native_bf16
    assert "avx512f" not in detect(XEON_AVX512, capability="AVX2").flags


def test_without_fbgemm_or_the_own_kernels_bf16_is_the_slow_choice_and_says_so(monkeypatch):
    monkeypatch.setattr(cpu, "own_bf16_isa", lambda info=None: None)  # as where the C library cannot be built
    info = detect(EPYC_AVX2, capability="AVX2", fbgemm_built=False)
    assert cpu.default_dtype(CPU, info) == torch.float32
    assert cpu.linear_path(CPU, torch.bfloat16, info) == "aten"
    note = cpu.dtype_note(CPU, torch.bfloat16, info)
    assert note.startswith("note: bfloat16 has no fast kernels") and "\n" not in note
    assert cpu.dtype_note(CPU, torch.float32, info) is None


def test_the_own_avx2_kernel_makes_bfloat16_the_default_unless_turned_off(monkeypatch):
    if not OWN_AVX2:
        pytest.skip(f"the C kernels do not run their AVX2 loop here: {qkernels.unavailable() or qkernels.best_isa()}")
    info = detect(EPYC_AVX2, capability="AVX2", fbgemm_built=False)
    assert cpu.linear_path(CPU, torch.bfloat16, info) == "own-bf16" and cpu.default_dtype(CPU, info) == torch.bfloat16
    monkeypatch.setenv("LLAMA_OWN_BF16_AVX2", "0")
    assert cpu.linear_path(CPU, torch.bfloat16, info) == "aten"
    assert cpu.linear_path(CPU, torch.bfloat16, detect(EPYC_AVX2, capability="AVX2")) == "fbgemm-fp16"


def test_describe_prints_the_bfloat16_kernels_choice():
    if not OWN_AVX2:
        pytest.skip(f"the C kernels do not run their AVX2 loop here: {qkernels.unavailable() or qkernels.best_isa()}")
    layer = ColumnParallelLinear(64, 48)
    layer.use_kernel(cpu.OwnBf16Linear(weight(), isa="avx2"))
    assert "; own-bf16 avx2 (LLAMA_OWN_BF16_AVX2=0: fbgemm)" in cpu.describe(layer)


def test_float32_where_bfloat16_is_fast_gets_a_note():
    info = detect(EPYC_AVX2, capability="AVX2")
    assert "twice the bytes" in cpu.dtype_note(CPU, torch.float32, info)
    assert cpu.dtype_note(CPU, torch.bfloat16, info) is None


def test_quantized_prefill_is_integer_with_vnni_and_no_amx():
    amx = {"model name": "Intel(R) Xeon(R) Platinum 8481C", "flags": XEON_AVX512["flags"] + " avx512_bf16 amx_bf16"}
    assert cpu.quantized_prefill("avx512_vnni", detect(XEON_AVX512)) == "integer"
    assert cpu.quantized_prefill("avx512_vnni", detect(amx)) == "dequantized"  # AMX's bf16 tiles win there
    assert cpu.quantized_prefill("avx2", detect(EPYC_AVX2, capability="AVX2")) == "dequantized"
    # int4 on AVX2: the panels' kernel, 4 activation rows per unpacked code vector, outruns the dequantized GEMM
    assert cpu.quantized_prefill("avx2", detect(EPYC_AVX2, capability="AVX2"), kind="int4") == "integer"
    assert cpu.quantized_prefill("avx512_vnni", detect(amx), kind="int4") == "dequantized"


def test_gpu_keeps_plain_linear():
    info = detect(EPYC_BF16)
    assert cpu.linear_path(torch.device("cuda"), torch.bfloat16, info) == "aten"
    assert cpu.kernel_for(torch.device("cuda"), torch.bfloat16) is None
    assert cpu.dtype_note(torch.device("cuda"), torch.bfloat16, info) is None


def test_describe_names_the_cpu_the_deciding_flags_and_the_kernels_counted_from_the_model():
    info = detect(EPYC_AVX2, capability="AVX2")
    model = torch.nn.Sequential(ColumnParallelLinear(64, 48), ColumnParallelLinear(64, 48))
    model[0].use_kernel(torch.nn.Identity())
    line = cpu.describe(model, info)
    assert "AMD EPYC 7B12" in line and "avx2" in line and "-avx512_bf16" in line
    assert "linear layers: 1 Identity, 1 aten" in line
    assert "\n" not in line


@pytest.mark.parametrize("threads, words", [(1, "; 1 thread, "), (2, "; 2 threads, ")])
def test_describe_counts_threads_in_good_english(threads, words, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert words in cpu.describe(None, detect(EPYC_AVX2, capability="AVX2"))


def test_without_proc_cpuinfo_the_flags_come_from_pytorch_dispatch():
    assert {"avx2", "fma", "f16c"} <= detect({}, capability="AVX2").flags
    assert detect({}, capability="DEFAULT").flags == frozenset()


# --- numerics on this machine --------------------------------------------------------------------------------


def weight(out_features=48, in_features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=g) * 0.05).to(torch.bfloat16)


def kernels():
    info = cpu.info()
    return [pytest.param(cpu.OneDnnLinear, marks=pytest.mark.skipif(
                not info.onednn_bf16, reason=f"oneDNN has no bfloat16 kernels on this CPU: {cpu.describe()}")),
            pytest.param(cpu.Fp16Linear, marks=pytest.mark.skipif(
                not info.fbgemm, reason=f"fbgemm needs x86 with AVX2, FMA and F16C: {cpu.describe()}"))]


@pytest.mark.parametrize("kind", kernels())
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_each_kernel_computes_the_bf16_product(kind, rows):
    w = weight()
    x = torch.randn(2, rows, 64).to(torch.bfloat16)
    got = kind(w)(x)
    want = F.linear(x.float(), w.float())  # the exact product; both round once to bf16 at most
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 48)
    torch.testing.assert_close(got.float(), want, atol=0, rtol=2 ** -7)


@pytest.mark.parametrize("kind", kernels())
def test_each_kernel_runs_inside_torch_compile(kind):
    w, x = weight(), torch.randn(1, 1, 64).to(torch.bfloat16)
    kernel = kind(w)
    compiled = torch.compile(lambda t: kernel(t) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), kernel(x) * 2)


@pytest.mark.parametrize("name", ["onednn-bf16", "fbgemm-fp16"])
def test_kernel_for_a_forced_path_prepares_each_layer_of_a_model(name):
    if not (cpu.info().onednn_bf16 if name == "onednn-bf16" else cpu.info().fbgemm):
        pytest.skip(f"{name} cannot run on this CPU: {cpu.describe()}")
    layer = ColumnParallelLinear(64, 48)
    layer.weight.data = weight()
    x = torch.randn(3, 64).to(torch.bfloat16)
    want = layer(x)
    prepared = cpu.kernel_for(CPU, torch.bfloat16, name)(layer.weight.data)
    layer.use_kernel(prepared)
    assert cpu.kernel_counts(layer) == {name: 1}
    torch.testing.assert_close(layer(x).float(), want.float(), atol=0, rtol=2 ** -7)
    assert cpu.kernel_for(CPU, torch.bfloat16, name)(torch.nn.Identity()) is None  # not a weight: left alone


def test_bfloat16_weights_are_exact_in_fp16_down_to_two_to_the_minus_17():
    w = torch.tensor([2.0 ** -17, -(2.0 ** -17) * 1.5, 1e-3, 0.3, -7.25, 60000.0]).to(torch.bfloat16)
    assert torch.equal(w.half().to(torch.bfloat16), w)


def test_a_weight_beyond_fp16_range_stays_plain():
    w = weight()
    w[0, 0] = 1e6
    assert not cpu.Fp16Linear.accepts(w) and cpu.Fp16Linear.accepts(weight())
    if cpu.info().fbgemm:
        assert cpu.kernel_for(CPU, torch.bfloat16, "fbgemm-fp16")(w) is None


@pytest.mark.skipif(not cpu.info().fbgemm, reason="fbgemm needs x86 with AVX2, FMA and F16C")
def test_fbgemm_weights_are_released_with_their_holder():
    before = len(cpu._FBGEMM_WEIGHTS)
    kernel = cpu.Fp16Linear(weight())
    assert len(cpu._FBGEMM_WEIGHTS) == before + 1
    del kernel
    assert len(cpu._FBGEMM_WEIGHTS) == before


@pytest.mark.skipif(not cpu.info().fbgemm, reason="fbgemm needs x86 with AVX2, FMA and F16C")
def test_large_weights_are_packed_in_row_blocks_with_the_same_product(monkeypatch):
    monkeypatch.setattr(cpu, "PACK_BLOCK", 48 * 64 // 3)  # 48 rows in blocks of 16
    w, x = weight(), torch.randn(5, 64).to(torch.bfloat16)
    kernel = cpu.Fp16Linear(w)
    assert len(kernel.packed.keys) == 3
    torch.testing.assert_close(kernel(x).float(), F.linear(x.float(), w.float()), atol=0, rtol=2 ** -7)


def test_an_emulated_cpu_gets_a_compile_cache_of_its_own():
    """Inductor's cache ignores ATEN_CPU_CAPABILITY: kernels cached natively gave wrong results when emulating."""
    code = "import llama, os; print(os.environ.get('TORCHINDUCTOR_CACHE_DIR'))"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["PYTHONPATH"] = str(ROOT)
    native = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    emulated = subprocess.run([sys.executable, "-c", code], env={**env, "ATEN_CPU_CAPABILITY": "avx2"},
                              capture_output=True, text=True, check=True)
    assert native.stdout.strip() == "None"
    assert emulated.stdout.strip().endswith("_avx2")
