"""What loading says: a plain line about where the model runs by default, the kernels with LLAMA_LOG=debug (a
program's --verbose); each shard as it is read; and nothing slow that it does not say (a multi-shard read once
imported torch._dynamo, 1 to 7 seconds, for a layout computed on meta tensors)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import MHA, ROOT, TOKENIZER, make_checkpoint
from llama import Llama
from llama.checkpoints import loading
from llama.cpu import info


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("two") / "ckpt", MHA, n_shards=2)


@pytest.mark.parametrize("level", ["", "debug"])
def test_the_load_banner_is_plain_unless_verbose(level, two_shards, capsys, monkeypatch):
    monkeypatch.setenv("LLAMA_LOG", level)
    Llama.build(str(two_shards), str(TOKENIZER), max_seq_len=16, max_batch_size=1, device="cpu")
    out = capsys.readouterr().out
    assert "read shard 1/2 (consolidated.00.pth, " in out and "read shard 2/2 (consolidated.01.pth, " in out
    if level == "debug":
        assert "linear layers: " in out and "OpenMP wait" in out
    else:
        assert f"Running on {info().model} with " in out and "--verbose or LLAMA_LOG=debug" in out
        assert "linear layers" not in out and "avx" not in out


def test_verbose_flag_sets_the_log_level(monkeypatch):
    from llama.programs import chat

    monkeypatch.setenv("LLAMA_LOG", "")  # recorded, so that the flag's setting is undone after the test
    assert not loading.verbose()
    assert chat.parser().parse_args(["--verbose"]).verbose
    assert loading.verbose()


def test_reading_shards_into_another_process_count_imports_no_compiler(two_shards):
    """Slicing two shards for one process computes the model's layout on meta tensors: that must not import
    torch._dynamo (it took 1 s on a quiet machine, 6 s on a loaded one, for a 13 MB checkpoint)."""
    code = ("import sys, torch\nfrom llama.checkpoints.checkpoint import load_rank_state\n"
            f"state = load_rank_state(sorted(__import__('glob').glob({str(two_shards)!r} + '/*.pth')), 0, 1)\n"
            "assert state['layers.0.attention.wq.weight'].shape[0] == 64\n"
            "print('torch._dynamo' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
