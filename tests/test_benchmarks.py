"""The benchmark scripts at a tiny shape: they say which kernel path ran, and bench_core leaves no files behind
however it ends. (No timing is asserted: these run on shared machines.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from forked import run_python
from helpers import ROOT
from llama import cpu

TINY = ["--dim", "128", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]


def left_behind(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.name.startswith("bench_core-")]  # not torch's own caches


def run_env(tmp_path):
    return dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_bench_core_reports_the_path_that_ran_and_cleans_up(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), *TINY, "--skip_hf",
                          "--decode_tokens", "2", "--threads", "1"],
                         env=run_env(tmp_path), capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["packed_linear_modules"].endswith(" of 9")  # fused wqkv, wo, w13, w2 per layer and the output
    packed = int(result["packed_linear_modules"].split()[0])
    assert sum(result["linear_kernels"].values()) == 9
    assert packed == 9 - result["linear_kernels"].get("aten", 0)
    assert result["describe"].startswith("cpu: ") and isinstance(result["cpu_flags"], list)
    assert "ours: decode at batch 4" in out.stderr  # progress
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_bench_core_stopped_midway_removes_its_checkpoint(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), *TINY, "--threads", "1"],
                            env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "step 'ours'" in line:  # the checkpoint is written and a measuring process is starting
                assert left_behind(tmp_path)
                proc.send_signal(sig)
                break
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert left_behind(tmp_path) == []


def test_bench_decode_reports_the_path_that_ran():
    out = run_python(str(ROOT / "benchmarks" / "bench_decode.py"), "--n_layers", "1", "--decode_tokens", "2",
                     "--prompt_len", "8", "--repeat", "1", "--threads", "1", cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)  # forked (tests/forked.py)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["packed_linear_modules"].endswith(" of 5")
    assert {"linear_kernels", "cpu", "cpu_flags", "aten_capability", "omp_wait_policy"} <= set(result)
    assert result["decode_step"] == "eager"  # on a CPU, as Llama.build


def test_bench_cpu_reports_each_precision_with_its_kernels_and_bandwidth_share():
    out = run_python(str(ROOT / "benchmarks" / "bench_cpu.py"), "--dim", "256", "--n_layers", "1", "--rounds", "1",
                     "--decode_tokens", "2", "--prompt_len", "40", "--threads", "1", "--read_gib", "0.125", "--aten",
                     cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)  # forked (tests/forked.py)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    own_bf16 = cpu.linear_path(torch.device("cpu"), torch.bfloat16, max_batch=1) == "own-bf16"
    assert list(result["precisions"]) == ["bfloat16", "int8", "int4_g64"] + ["bfloat16_onednn"] * own_bf16 + [
        "int8_aten", "int4_g64_aten"]
    assert result["read_bandwidth_gb_s"] > 0 and result["date"] and result["cpu"]
    for name, entry in result["precisions"].items():
        assert entry["decode_tok_s"] > 0 and entry["prefill_tok_s"] > 0 and entry["bandwidth_share"] > 0
        assert sum(entry["kernels"].values()) == 5  # fused wqkv, wo, w13, w2 and the output
        if name.endswith("_aten"):
            assert set(entry["kernels"]) == {name.split("_")[0].capitalize() + "Linear/aten"}
    if own_bf16:
        assert set(result["precisions"]["bfloat16"]["kernels"]) == {"own-bf16"}
        assert set(result["precisions"]["bfloat16_onednn"]["kernels"]) == {"onednn-bf16"}
    # int8 reads about half the bytes of bfloat16, int4 (groups of 64) about a quarter plus its scales
    sizes = {name: entry["weight_bytes_read_per_token"] for name, entry in result["precisions"].items()}
    assert 0.45 < sizes["int8"] / sizes["bfloat16"] < 0.55 and 0.25 < sizes["int4_g64"] / sizes["bfloat16"] < 0.35


def test_bench_decode_against_transformers_needs_no_pytest(tmp_path):
    """--hf converts the weights with benchmarks/hf_reference.py, a plain module: no tests/ on the path, no
    pytest (an installed pytest is hidden here behind one that cannot be imported)."""
    pytest.importorskip("transformers")
    (tmp_path / "pytest.py").write_text("raise ImportError('no pytest in this environment')\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--n_layers", "1",
                          "--dim", "256", "--decode_tokens", "2", "--prompt_len", "8", "--repeat", "1",
                          "--threads", "1", "--batches", "1", "--hf", "--pairs", "1"],
                         env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert any("hf" in key or "transformers" in key for key in result), sorted(result)
