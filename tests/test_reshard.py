"""`python -m llama reshard SRC DST --mp N`: bit-exact round trips, one target shard in memory at a time,
no overwriting, no half-written shard under a final name, clear errors."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from forked import run_python
from helpers import GQA, MHA, ROOT, make_checkpoint
from llama import reshard as reshard_mod
from llama.checkpoints.checkpoint import find_shards, random_state, split_state
from llama.programs.reshard import main
from llama.checkpoints.reshard import reshard


def load_shards(folder: Path) -> List[Dict[str, torch.Tensor]]:
    return [torch.load(p, map_location="cpu", weights_only=True) for p in find_shards(folder)]


def assert_shards_equal(got: List[Dict[str, torch.Tensor]], want: List[Dict[str, torch.Tensor]], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} shards, expected {len(want)}"
    for index, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), f"{what}: shard {index} has other entries"
        for key in w:
            assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape, f"{what}: {key} in shard {index}"
            assert torch.equal(g[key], w[key]), f"{what}: {key} in shard {index} differs"


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m llama reshard ARGS`, forked from a process that has imported torch (tests/forked.py)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return run_python("-m", "llama", "reshard", *args, cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("args, chain", [(MHA, [4, 2, 1]), (GQA, [2, 1]), (MHA, [1, 1])],
                         ids=["mha", "gqa", "same-count"])
def test_round_trip_is_bit_exact(tmp_path, args, chain):
    state = random_state(args, seed=5)
    src = make_checkpoint(tmp_path / "original", args, 1, state=state)
    params = (src / "params.json").read_bytes()
    for step, n in enumerate(chain):
        dst = tmp_path / f"step{step}-mp{n}"
        assert main([str(src), str(dst), "--mp", str(n)]) == 0
        assert_shards_equal(load_shards(dst), list(split_state(state, n)), f"-> {n} shards")
        assert (dst / "params.json").read_bytes() == params
        assert all("rope.freqs" in shard for shard in load_shards(dst))
        src = dst
    assert_shards_equal(load_shards(src), [state], "round trip back to 1 shard")


def test_converts_to_bfloat16(tmp_path):
    state = random_state(MHA, seed=6, dtype=torch.float32)
    src = make_checkpoint(tmp_path / "f32", MHA, 2, state=state)
    reshard(src, tmp_path / "bf16", 4)
    want = [{k: v.to(torch.bfloat16) for k, v in shard.items()} for shard in split_state(state, 4)]
    assert_shards_equal(load_shards(tmp_path / "bf16"), want, "float32 -> bfloat16")


def test_one_target_shard_in_memory_at_a_time(tmp_path, monkeypatch):
    """Each target shard is built, written and released before the next one is built."""
    src = make_checkpoint(tmp_path / "src", MHA, 1, seed=7)
    alive: List[weakref.ref] = []
    calls: List[int] = []
    real = reshard_mod.load_rank_state

    def tracked(shards, rank, world, **kwargs):
        gc.collect()
        assert not any(ref() is not None for ref in alive), "the previous target shard is still in memory"
        state = real(shards, rank, world, **kwargs)
        alive[:] = [weakref.ref(t) for t in state.values()]
        calls.append(rank)
        return state

    monkeypatch.setattr(reshard_mod, "load_rank_state", tracked)
    reshard(src, tmp_path / "dst", 4)
    assert calls == [0, 1, 2, 3]


def test_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "src", MHA, 1, seed=8)
    dst = make_checkpoint(tmp_path / "dst", MHA, 2, seed=9)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert main([str(src), str(dst), "--mp", "2"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert main([str(src), str(src), "--mp", "1"]) == 2  # nor over its own source
    assert "same directory" in capsys.readouterr().err
    # An empty existing folder is fine.
    (tmp_path / "empty").mkdir()
    assert main([str(src), str(tmp_path / "empty"), "--mp", "2"]) == 0


@pytest.mark.parametrize("args, mp, message", [
    (GQA, "4", "valid process counts: [1, 2]"),  # 2 KV heads
    (MHA, "3", "valid process counts: [1, 2, 4]"),
    (MHA, "0", "valid values for this checkpoint: [1, 2, 4]"),
])
def test_impossible_shard_count_is_a_clear_error(tmp_path, capsys, args, mp, message):
    src = make_checkpoint(tmp_path / "src", args, 1, seed=10)
    assert main([str(src), str(tmp_path / "dst"), "--mp", mp]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()  # nothing is created before the checks pass


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "dst"), "--mp", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_interrupted_write_leaves_no_shard(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the second shard is being written: the partial file never gets a final name, and the
    shards written before it are removed, so the same command can simply be run again."""
    src = make_checkpoint(tmp_path / "src", MHA, 1, seed=11)
    real_save = torch.save
    count = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        count["n"] += 1
        if count["n"] == 2:
            f.write(b"PK\x03\x04 half a shard")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--mp", "4"]) == 130
    assert sorted(p.name for p in dst.iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    assert main([str(src), str(dst), "--mp", "4"]) == 0
    assert len(find_shards(dst)) == 4


def test_killed_run_leaves_only_complete_shards(tmp_path):
    """A hard kill in the middle of shard 1: shard 0 is complete, shard 1 exists only as a hidden temporary
    file, there is no params.json, and a new run refuses the leftovers as an interrupted write."""
    src = make_checkpoint(tmp_path / "src", MHA, 1, seed=12)
    dst = tmp_path / "dst"
    script = textwrap.dedent(f"""
        import os, sys, torch
        from llama.programs.reshard import main
        real_save, count = torch.save, [0]
        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] == 2:
                f.write(b"PK\\x03\\x04 half a shard"); f.flush()
                os._exit(137)
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
        sys.exit(main([{str(src)!r}, {str(dst)!r}, "--mp", "4"]))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    names = sorted(p.name for p in dst.iterdir())
    assert names == [".consolidated.01.pth.tmp", "consolidated.00.pth"]
    shard0 = torch.load(dst / "consolidated.00.pth", weights_only=True)
    assert_shards_equal([shard0], [next(split_state(load_shards(src)[0], 4))], "shard written before the kill")
    again = cli(str(src), str(dst), "--mp", "4")
    assert again.returncode == 2
    assert "interrupted write" in again.stderr and "Traceback" not in again.stderr


def test_command_line(tmp_path):
    src = make_checkpoint(tmp_path / "src", GQA, 2, seed=13)
    ok = cli(str(src), str(tmp_path / "one"), "--mp", "1")
    assert ok.returncode == 0, ok.stderr
    assert "[1/1] consolidated.00.pth" in ok.stdout
    assert_shards_equal(load_shards(tmp_path / "one"), [random_state(GQA, seed=13)], "2 -> 1 via the CLI")
    bad = cli(str(src), str(tmp_path / "four"), "--mp", "4")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "valid process counts: [1, 2]" in bad.stderr
    assert "Traceback" not in bad.stderr
