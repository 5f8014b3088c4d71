"""The project's quantized CPU kernels (llama/cpu/csrc/qlinear.c through llama/cpu/qkernels.py), against an independent
reference: the weight dequantized by llama.checkpoints.quantize's own plain form (torch), times the activations, in float64.

The kernels round each block of 32 activations to 8 bits (a scale of max|x| / 127 per block), so an output may
differ from the exact product by at most half a step per input: sum over blocks of (max|x_b| / 254) * sum|w_b|
per output row. That bound, plus float32 accumulation and the output's rounding, is the tolerance. Each
instruction set this CPU runs is forced in turn (the others are skipped, saying why); speed is measured by
benchmarks/bench_cpu.py, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, require_kernels
from llama import cpu, qkernels, quantize
from llama.checkpoints.quantize import Int4Linear, Int8Linear, quantize_weight

LEVELS = list(qkernels.ISAS)  # scalar, avx2, avx512_vnni


def _runnable(isa: str) -> None:
    require_kernels()
    best = qkernels.best_isa()
    if LEVELS.index(isa) > LEVELS.index(best):
        pytest.skip(f"this CPU runs the C kernels up to {best}, not {isa}")


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[0] += 0.3  # an offset row (asymmetric int4 groups) and an outlier
    w[-1, k // 3] = 1.5
    return w


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(m, k, generator=g)
    x[:, 5] *= 20  # an outlier channel, as real activations have
    x[0, 32:64] = 0  # an all-zero block (scale 0)
    return x.to(torch.bfloat16)


def _reference_and_bound(x: torch.Tensor, w: torch.Tensor):
    """x @ w.T in float64, and the largest difference 8-bit activations per block of 32 may make."""
    x64, w64 = x.double(), w.double()
    exact = x64 @ w64.t()
    half_step = x64.abs().reshape(x.shape[0], -1, 32).amax(-1) / 254  # (M, K/32)
    block_w = w64.abs().reshape(w.shape[0], -1, 32).sum(-1)  # (N, K/32)
    bound = half_step @ block_w.t()
    slack = 1e-5 * (x64.abs() @ w64.abs().t()) + 1e-6  # float32 sums and scales
    return exact, bound + slack


SHAPES = [(1, 1, 64), (1, 5, 128), (3, 37, 320), (2, 96, 2048), (5, 40, 256), (9, 17, 512), (21, 40, 256),
          (34, 70, 512), (7, 33, 256)]  # (M, N, K): odd row counts, short rows; 5, 7 and 9 activation rows run the
# int4 kernel 4 rows at a time, then the rest (AVX-512: one by one; AVX2: 1 or 3 together); 9, 21 and 34 rows take
# int8's GEMM (AVX-512), 4 rows at a time and the rest one by one, its last panel partly padding (N = 17, 40, 70)
# or absent tiles (40, 70)


def _packed(plain, mode: str, n: int, group):
    """A quantized weight in the kernels' layout: (bits, packed weight, per-row scales or None for int4)."""
    if mode == "int8":
        rscale = plain.scales.float()
        return 8, qkernels.pack_int8(plain.qweight), torch.cat([rscale, rscale.new_zeros(-n % 4)])
    return 4, qkernels.pack_int4(plain.qweight, plain.scales, plain.zeros, group), None


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_kernel_is_within_the_activation_rounding_of_the_exact_product(isa, threads, mode, group):
    _runnable(isa)
    for seed, (m, n, k) in enumerate(SHAPES):
        if group and k % group:
            continue
        plain = quantize_weight(_weight(n, k, seed), mode, group)
        x = _activations(m, k, seed)
        bits, packed, rscale = _packed(plain, mode, n, group)
        got = qkernels.linear(x.float(), bits, packed, rscale, n, group or 0, isa, threads)
        exact, bound = _reference_and_bound(x.float(), plain.dequantize())
        err = (got.double() - exact).abs()
        assert got.shape == (m, n) and bool((err <= bound).all()), \
            (m, n, k, float((err - bound).max()), float(bound.max()))
        assert float(err.max()) > 0 or k == 64  # the activations really are rounded (not an exact path)
        # bfloat16 in and out: the same, rounded once more
        bf16 = qkernels.linear(x, bits, packed, rscale, n, group or 0, isa, threads)
        assert bf16.dtype == torch.bfloat16
        assert bool(((bf16.double() - exact).abs() <= bound + exact.abs() * 2 ** -8).all())


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_dequantize_gives_the_plain_forms_weights(isa, mode, group):
    _runnable(isa)
    n, k = 37, 256
    plain = quantize_weight(_weight(n, k, 3), mode, group)
    kind, packed, rscale = _packed(plain, mode, n, group)
    rows = slice(3, 30)
    got = qkernels.dequantize(kind, packed, rscale, k, group or 0, rows, torch.float32, isa, threads=2)
    assert torch.equal(got, plain.dequantize()[rows])
    got16 = qkernels.dequantize(kind, packed, rscale, k, group or 0, rows, torch.bfloat16, isa, threads=1)
    assert torch.equal(got16, plain.dequantize()[rows].to(torch.bfloat16))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_avx2_prefill_gemm_matches_the_float64_product(threads, mode, group):
    """qk_gemm_quantized (AVX2 prefill: dequantized panels of 24 rows through linear16.c's GEMM, 4 activation rows
    at a time): float32 sums of the exact weights, the output rounded once to bfloat16."""
    _runnable("avx2")
    for seed, (m, n, k) in enumerate([(1, 5, 256), (6, 50, 256), (33, 24, 512), (40, 77, 384)]):
        if group and k % group:
            continue
        plain = quantize_weight(_weight(n, k, seed), mode, group)
        x = _activations(m, k, seed)
        bits, packed, rscale = _packed(plain, mode, n, group)
        got = qkernels.gemm_quantized(x, bits, packed, rscale, n, group or 0, threads)
        exact = x.double() @ plain.dequantize().double().t()
        tol = exact.abs() * 2 ** -8 + 1e-5 * (x.double().abs() @ plain.dequantize().double().abs().t()) + 1e-6
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        assert bool(((got.double() - exact).abs() <= tol).all()), (m, n, k)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 64)])
def test_modules_choose_the_kernels_and_prefill_path(mode, group):
    isa = quantize.own_kernel_isa(quantize_weight(_weight(8, 256, 0), mode, group), torch.bfloat16)
    if isa is None:
        pytest.skip(f"the C kernels do not run here: {qkernels.unavailable() or 'no AVX2'}")
    plain = quantize_weight(_weight(40, 256, 1), mode, group)
    layer = (Int8Linear if mode == "int8" else Int4Linear)(plain, torch.bfloat16)
    assert layer.path.endswith("/" + isa) and layer.own.prefill == cpu.quantized_prefill(isa, kind=mode)
    for gemm_dtype in {layer.own.gemm_dtype, torch.bfloat16}:  # this CPU's choice, and dequantized tiles
        layer.own.gemm_dtype = gemm_dtype
        for m in (1, quantize.CPU_PREFILL_ROWS - 1, quantize.CPU_PREFILL_ROWS, 40):  # both sides of the switch
            x = _activations(m, 256, m)
            got = layer(x.reshape(1, m, 256))
            exact, bound = _reference_and_bound(x.float(), plain.dequantize())
            assert got.shape == (1, m, 40) and got.dtype == torch.bfloat16
            # Prefill-sized calls: the integer kernels (the bound above) or, dequantized, bfloat16 weights and
            # activations in a float GEMM.
            tol = bound + exact.abs() * 2 ** -7 + 2 ** -8 * (x.double().abs() @ plain.dequantize().double().abs().t())
            assert bool(((got[0].double() - exact).abs() <= tol).all())


def test_an_int8_code_of_minus_128_counts_as_minus_127():
    # The library's quantizer never writes -128, but a checkpoint from elsewhere may: the kernels negate codes.
    _runnable("scalar")
    plain = quantize_weight(_weight(4, 64, 0), "int8")
    plain.qweight[1, 7] = -128
    packed = qkernels.pack_int8(plain.qweight)
    assert int(packed.view(torch.int8).min()) == -127
    clipped = plain.qweight.clamp(min=-127).float() * plain.scales.float()[:, None]
    x = _activations(1, 64, 0)
    exact, bound = _reference_and_bound(x.float(), clipped)
    got = qkernels.linear(x.float(), 8, packed, plain.scales.float(), 4, 0, qkernels.best_isa())
    assert bool(((got.double() - exact).abs() <= bound).all())


def test_a_shape_the_kernels_refuse_falls_back_to_pytorch():
    plain = quantize_weight(_weight(16, 96, 0), "int8")  # 96 inputs: not a multiple of 64
    assert quantize.own_kernel_isa(plain, torch.bfloat16) is None
    assert qkernels.packed_bytes(8, 16, 96) == -1
    layer = Int8Linear(plain, torch.bfloat16)
    assert layer.path == "Int8Linear/aten"
    x = torch.randn(2, 96).to(torch.bfloat16)
    assert torch.allclose(layer(x).float(), F.linear(x.float(), plain.dequantize()), rtol=2e-2, atol=2e-2)


def test_without_a_compiler_quantized_models_use_pytorch_and_say_so(tmp_path):
    demo = ROOT / "demo" / "fortune-llama"
    code = ("from llama import Llama\n"
            f"g = Llama.build({str(demo)!r}, {str(demo / 'tokenizer.model')!r}, max_seq_len=64, max_batch_size=1, "
            "device='cpu', quantize='int8')\n"
            "print(len(g.text_completion(['Hello'], max_gen_len=4, temperature=0)[0]['generation']) > 0)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), CC="no-such-compiler", PATH=str(tmp_path), LLAMA_LOG="debug",
               LLAMA_KERNEL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "the quantized CPU kernels could not be built (no C compiler found" in out.stderr
    assert "Int8Linear/aten" in out.stdout + out.stderr and out.stdout.strip().endswith("True")
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def test_the_library_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
    from llama.cpu import kernel_build

    require_kernels()
    # One small source stands for csrc/ (the caching is the point here, and the real compile takes ~7 s of CPU);
    # the cache folder holds only what the build leaves there.
    small = tmp_path / "src" / "small.c"
    small.parent.mkdir()
    small.write_text("int qk_small(void) { return 1; }\n")
    monkeypatch.setattr(kernel_build, "SOURCES", [small])
    tmp_path = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    first = qkernels.build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert qkernels.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    # no temporary left behind (the lock file stays: removing it could let two processes lock different files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, first.with_suffix(".lock").name])


def test_an_install_carries_the_c_source():
    # A wheel (or a non-editable install) has no checkout beside it: setup.py must ship the source to compile.
    setup = (ROOT / "setup.py").read_text()
    assert '"llama.cpu": ["csrc/*.c", "csrc/*.h"]' in setup
    shipped = {p.name for p in (ROOT / "llama" / "cpu" / "csrc").iterdir() if p.suffix in (".c", ".h")}
    assert {p.name for p in qkernels.SOURCES + qkernels.HEADERS} == shipped
