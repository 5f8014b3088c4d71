"""The project's bfloat16 CPU kernel (llama/cpu/csrc/linear16.c through llama/cpu/qkernels.py and llama.cpu's
`own-bf16` path), against float64 products of the same bfloat16 numbers, each of its loops (portable C, AVX2's
matrix-vector tiles and GEMM, AVX-512 BF16) forced in turn; and how decoding steps use the kernels' threads
(llama.qkernels.decoding_threads). Speed is measured by benchmarks/bench_cpu.py, not here. With
LLAMA_REQUIRE_KERNELS=1 a library that cannot be built fails these tests instead of skipping them."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from helpers import require_kernels
from llama import cpu, qkernels
from llama.model import ModelArgs, Transformer


def _built() -> None:
    require_kernels()


def _runs(isa: str) -> None:
    """Skip (saying why) where this CPU has not the loop `isa` names: the CPU kind, not the code."""
    _built()
    if qkernels.bf16_isa(isa) != isa:
        pytest.skip(f"this CPU runs the bfloat16 kernel's {qkernels.bf16_isa(isa)} loop, not {isa}")


def _pair(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    return x, w


def _close_to_exact(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within float32 summation and one bfloat16 rounding of the output."""
    exact = x.double() @ w.double().t()
    slack = 1e-5 * (x.double().abs() @ w.double().abs().t()) + exact.abs() * 2 ** -8 + 1e-6
    assert ((y.double() - exact).abs() <= slack).all(), float(((y.double() - exact).abs() - slack).max())


@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 5, 64), (2, 37, 320), (3, 64, 256), (4, 9, 96), (9, 130, 2048),
                                   (16, 23, 64), (17, 50, 160), (40, 130, 512)])  # from 16 rows: AVX2's GEMM
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512_vnni"])
def test_kernel_is_the_product_within_float32_sums(m, n, k, threads, isa):
    _runs(isa)
    x, w = _pair(m, n, k, seed=m * 1000 + n)
    y = qkernels.linear_bf16(x, qkernels.pack_bf16(w), n, threads=threads, isa=isa)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    _close_to_exact(y, x, w)


def test_avx2_runs_wherever_the_cpu_has_it():
    _built()
    if qkernels.best_isa() in ("avx2", "avx512_vnni"):
        assert qkernels.bf16_isa("avx2") == "avx2"
    assert qkernels.bf16_isa("scalar") == "scalar"


def test_unpacked_rows_are_the_weight_exactly():
    _built()
    _, w = _pair(1, 70, 128, seed=3)
    packed = qkernels.pack_bf16(w)
    buf = torch.empty(70 * 128, dtype=torch.bfloat16)
    assert torch.equal(qkernels.untile_bf16(packed, 128, slice(0, 70), buf), w)
    assert torch.equal(qkernels.untile_bf16(packed, 128, slice(13, 50), buf), w[13:50])


def test_a_shape_the_kernel_refuses_is_named():
    _built()
    with pytest.raises(ValueError, match=r"\(4, 48\).*multiple of 32"):
        qkernels.pack_bf16(torch.zeros(4, 48, dtype=torch.bfloat16))
    assert not cpu.OwnBf16Linear.accepts(torch.zeros(4, 48, dtype=torch.bfloat16))


@pytest.mark.parametrize("m", [1, 2, 5, 31, 32, 70])
def test_module_decodes_with_the_kernel_and_prefills_through_onednn_exactly(m):
    _runs("avx512_vnni")
    x, w = _pair(m, 200, 256, seed=m)
    layer = cpu.OwnBf16Linear(w, isa="avx512_vnni")
    y = layer(x.view(1, m, 256))
    assert y.shape == (1, m, 200)
    if m < cpu.OWN_BF16_PREFILL_ROWS:
        _close_to_exact(y[0], x, w)
    else:  # the unpacked blocks are the weight itself: the same product as F.linear's
        assert torch.equal(y[0], F.linear(x, w))


def test_path_is_chosen_for_single_stream_models_on_cpus_with_avx512_bf16():
    _built()
    if not (cpu.info().native_bf16 and "avx512_bf16" in cpu.info().flags and qkernels.has_avx512_bf16()):
        pytest.skip("this CPU has no AVX-512 BF16: bfloat16 models use another path here")
    device = torch.device("cpu")
    assert cpu.linear_path(device, torch.bfloat16, max_batch=1) == "own-bf16"
    assert cpu.linear_path(device, torch.bfloat16, max_batch=cpu.OWN_BF16_MAX_BATCH + 1) == "onednn-bf16"
    assert cpu.linear_path(device, torch.bfloat16) == "onednn-bf16"
    assert cpu.linear_path(device, torch.float32, max_batch=1) != "own-bf16"


def test_path_is_chosen_on_avx2_at_every_batch_size_by_default(monkeypatch):
    _runs("avx2")
    avx2 = cpu.detect(capability="AVX2", env={}, onednn_bf16=True, fbgemm_built=True)  # as ATEN_CPU_CAPABILITY=avx2
    assert avx2.flags <= {"avx2", "fma", "f16c"} and cpu.own_bf16_isa(avx2) == "avx2"
    device = torch.device("cpu")
    monkeypatch.setenv("LLAMA_OWN_BF16_AVX2", "0")
    assert cpu.linear_path(device, torch.bfloat16, avx2, max_batch=1) == "fbgemm-fp16"  # turned off
    monkeypatch.delenv("LLAMA_OWN_BF16_AVX2", raising=False)  # the default
    for batch in (1, 4, None):
        assert cpu.linear_path(device, torch.bfloat16, avx2, max_batch=batch) == "own-bf16"
    assert cpu.linear_path(device, torch.float16, avx2) == "fbgemm-fp16"


@pytest.mark.parametrize("m", [1, 2, 5, 31, 70])
def test_avx2_module_is_the_product_at_every_size(m):
    _runs("avx2")
    x, w = _pair(m, 200, 256, seed=m)
    layer = cpu.OwnBf16Linear(w, isa="avx2")
    _close_to_exact(layer(x.view(1, m, 256))[0], x, w)
    assert cpu.OwnBf16Linear(w).isa == cpu.own_bf16_isa()


def test_decoding_threads_give_the_kernels_every_thread_and_restore_them():
    _built()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with qkernels.decoding_threads():
            assert torch.get_num_threads() == 1 and qkernels.kernel_threads() == 2
            with qkernels.decoding_threads():  # nested: unchanged
                assert torch.get_num_threads() == 1 and qkernels.kernel_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2 and qkernels.kernel_threads() == 2
        with pytest.raises(RuntimeError):
            with qkernels.decoding_threads():
                raise RuntimeError("a failing step")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_model_on_the_own_kernel_decodes_as_on_onednn():
    _built()
    if not cpu.info().onednn_bf16:
        pytest.skip("PyTorch's oneDNN has no bfloat16 kernels here: no reference path")
    from llama.model.decode_step import DecodeStep
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_batch_size=1,
                     max_seq_len=64)
    torch.manual_seed(0)
    ref = Transformer(args)
    with torch.no_grad():
        for param in ref.parameters():
            param.copy_(torch.randn(param.shape) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
    ref = ref.to(torch.bfloat16)
    own = Transformer(args).to(torch.bfloat16)
    own.load_state_dict(ref.state_dict())
    ref.prepare(cpu.kernel_for(torch.device("cpu"), torch.bfloat16, "onednn-bf16"))
    own.prepare(cpu.kernel_for(torch.device("cpu"), torch.bfloat16, "own-bf16"))
    assert cpu.decodes_on_own_kernels(own) and not cpu.decodes_on_own_kernels(ref)
    for model in (ref, own):
        model.setup_cache("cpu", torch.bfloat16)
    steps = [DecodeStep(ref, compiled=False), DecodeStep(own, compiled=False)]
    prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = ref(prompt, 0)[:, -1], own(prompt, 0)[:, -1]
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
        token = a.argmax(-1)
        for pos in range(12, 20):
            a, b = steps[0](token, [pos]), steps[1](token, [pos])
            torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
            token = a.argmax(-1)
