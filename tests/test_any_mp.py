"""Any checkpoint on any valid number of processes: S shards into M model-parallel ranks, one node or two.

The reference is the single-process run of the 1-shard (merged) checkpoint in this test process. Every other
(shards, processes) combination must give the same greedy tokens and log-probabilities within 1e-4 (float32).
torchrun launches are the costly part (several seconds each on a small machine), so one launch per process
count serves every checkpoint: the worker builds them one after the other in the same process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist

import mp_worker
from helpers import MHA, ROOT, SHAPES, make_checkpoint, run_torchrun
from llama import ModelArgs
from llama import checkpoint as ckpt_mod
from llama.checkpoints.checkpoint import (
    check_model_parallel_size,
    find_shards,
    load_rank_state,
    random_state,
    shards_for_rank,
    split_state,
    valid_model_parallel_sizes,
)

WORKER = Path(mp_worker.__file__)
TOL = 1e-4
SHARDS = {"mha": (1, 2, 4), "gqa": (1, 2)}  # every valid shard count of each test shape
SEEDS = {"mha": 11, "gqa": 12}
# Messages that mean a rank did not leave its process group cleanly.
UNCLEAN = re.compile(r"destroy_process_group\(\) was not called|abort|Traceback|ProcessGroup.*leak", re.I)


@pytest.fixture(scope="module")
def states() -> Dict[str, Dict[str, torch.Tensor]]:
    return {name: random_state(args, seed=SEEDS[name]) for name, args in SHAPES.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, states) -> Dict[str, Dict[int, Path]]:
    """The same weights of each shape written with every valid shard count."""
    root = tmp_path_factory.mktemp("any_mp")
    return {name: {s: make_checkpoint(root / f"{name}{s}", SHAPES[name], s, state=states[name])
                   for s in SHARDS[name]}
            for name in SHAPES}


@pytest.fixture(scope="module")
def reference(ckpts) -> Dict[str, dict]:
    """Single process, merged weights: the result every other combination must reproduce."""
    return {name: mp_worker.generate_for(str(ckpts[name][1])) for name in SHAPES}


def assert_same(result: dict, ref: dict, what: str) -> None:
    assert result["tokens"] == ref["tokens"], f"{what}: greedy tokens differ from the single-process run"
    worst = max(abs(a - b) for row, ref_row in zip(result["logprobs"], ref["logprobs"])
                for a, b in zip(row, ref_row))
    assert all(len(a) == len(b) for a, b in zip(result["logprobs"], ref["logprobs"]))
    assert worst <= TOL, f"{what}: log-probabilities differ by {worst:.2e} (> {TOL})"


def assert_clean_exit(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    bad = [line for line in proc.stderr.splitlines() if UNCLEAN.search(line)]
    assert not bad, f"{what} did not exit cleanly:\n" + "\n".join(bad[:10])


def read_ranks(out_dir: Path, world: int) -> List[dict]:
    files = [out_dir / f"rank{r}.json" for r in range(world)]
    assert all(f.is_file() for f in files), f"missing rank outputs in {out_dir}: {sorted(os.listdir(out_dir))}"
    return [json.loads(f.read_text()) for f in files]


def launch(tmp_path_factory, ckpt_dirs: List[Path], nproc: int):
    out = tmp_path_factory.mktemp(f"out_m{nproc}")
    proc = run_torchrun(WORKER, [str(out), *map(str, ckpt_dirs)], nproc=nproc, timeout=300)
    assert_clean_exit(proc, f"torchrun --nproc_per_node {nproc}")
    ranks = read_ranks(out, nproc)
    assert all(r["world"] == nproc for r in ranks)
    # Model parallelism gathers the logits on every rank: all ranks must have produced the same output.
    for r in ranks[1:]:
        assert r["results"] == ranks[0]["results"], f"rank {r['rank']} disagrees with rank 0"
    return ranks[0]["results"]


# --- slicing: every S -> M split gives exactly each rank's piece of the merged weights ---------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_load_rank_state_is_exact_for_every_split(tmp_path, name, states, ckpts):
    full = states[name]
    for world in valid_model_parallel_sizes(SHAPES[name]):
        expected = list(split_state(full, world))
        for n_shards, folder in ckpts[name].items():
            shards = find_shards(folder)
            for rank in range(world):
                got = load_rank_state(shards, rank, world)
                assert sorted(got) == sorted(expected[rank]), (n_shards, world, rank)
                for key, tensor in expected[rank].items():
                    assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), \
                        f"{key}: {n_shards} shards -> rank {rank} of {world} differs"
                assert "rope.freqs" in got


def test_each_rank_opens_only_the_shards_it_needs(monkeypatch, ckpts):
    opened: List[str] = []
    real_open = ckpt_mod.open_shard
    monkeypatch.setattr(ckpt_mod, "open_shard", lambda p, **kw: opened.append(Path(p).name) or real_open(p, **kw))
    shards = find_shards(ckpts["mha"][4])
    load_rank_state(shards, 1, 2)
    assert opened == ["consolidated.02.pth", "consolidated.03.pth"]
    opened.clear()
    load_rank_state(shards, 3, 4)  # one shard per rank: just its own
    assert opened == ["consolidated.03.pth"]
    assert [shards_for_rank(2, r, 4) for r in range(4)] == [[0], [0], [1], [1]]
    assert shards_for_rank(4, 0, 1) == [0, 1, 2, 3]
    assert shards_for_rank(1, 1, 2) == [0]


def test_inconsistent_shards_are_a_clear_error(tmp_path, states):
    state = states["mha"]
    folder = make_checkpoint(tmp_path / "bad", MHA, 2, state=state)
    second = torch.load(folder / "consolidated.01.pth", weights_only=True)
    second["layers.0.attention.wq.weight"] = second["layers.0.attention.wq.weight"][:8].clone()
    torch.save(second, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"do not hold the same entries.*layers\.0\.attention\.wq\.weight"):
        load_rank_state(find_shards(folder), 0, 1)


# --- impossible process counts -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, world, valid", [("mha", 3, [1, 2, 4]), ("gqa", 3, [1, 2]), ("gqa", 4, [1, 2]),
                                                 ("mha", 8, [1, 2, 4])])
def test_impossible_model_parallel_size_lists_valid_values(name, world, valid):
    assert valid_model_parallel_sizes(SHAPES[name]) == valid
    with pytest.raises(ValueError, match=re.escape(f"valid process counts: {valid}")):
        check_model_parallel_size(SHAPES[name], world)


@pytest.mark.parametrize("params, valid", [
    (dict(dim=4096, n_heads=32, n_layers=32), [1, 2, 4, 8, 16, 32]),  # 7B
    (dict(dim=5120, n_heads=40, n_layers=40), [1, 2, 4, 8]),  # 13B
    (dict(dim=8192, n_heads=64, n_kv_heads=8, n_layers=80, ffn_dim_multiplier=1.3, multiple_of=4096),
     [1, 2, 4, 8]),  # 70B
])
def test_valid_sizes_of_the_released_models(params, valid):
    assert valid_model_parallel_sizes(ModelArgs(vocab_size=32000, **params)) == valid


def test_impossible_process_count_fails_before_loading(tmp_path, ckpts):
    """4 processes for the grouped-query shape (2 KV heads): every rank stops with the list of valid counts."""
    proc = run_torchrun(WORKER, [str(tmp_path / "out"), str(ckpts["gqa"][2])], nproc=4, timeout=300)
    assert proc.returncode != 0
    assert "cannot be split over 4 model-parallel processes" in proc.stderr
    assert "valid process counts: [1, 2]" in proc.stderr
    assert "Loading" not in proc.stdout  # the error came before any weight was read
    assert not (tmp_path / "out" / "rank0.json").exists()


# --- generation: S shards x M processes == merged weights on one process -----------------------------------


@pytest.mark.parametrize("name, n_shards", [("mha", 2), ("mha", 4), ("gqa", 2)])
def test_one_process_any_shard_count(name, n_shards, ckpts, reference):
    result = mp_worker.generate_for(str(ckpts[name][n_shards]))
    assert_same(result, reference[name], f"{name}: {n_shards} shards on 1 process")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, ckpts):
    return launch(tmp_path_factory, [ckpts[name][s] for name in SHAPES for s in SHARDS[name]], nproc=2)


@pytest.mark.parametrize("name, n_shards", [(name, s) for name in SHARDS for s in SHARDS[name]])
def test_two_processes_any_shard_count(name, n_shards, ckpts, reference, two_processes):
    assert_same(two_processes[str(ckpts[name][n_shards])], reference[name], f"{name}: {n_shards} shards on 2 processes")


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory, ckpts):
    return launch(tmp_path_factory, [ckpts["mha"][s] for s in SHARDS["mha"]], nproc=4)


@pytest.mark.parametrize("n_shards", SHARDS["mha"])
def test_four_processes_any_shard_count(n_shards, ckpts, reference, four_processes):
    assert_same(four_processes[str(ckpts["mha"][n_shards])], reference["mha"], f"mha: {n_shards} shards on 4 processes")


# --- two nodes on loopback ---------------------------------------------------------------------------------


def run_two_nodes(out: Path, ckpt_dirs: List[Path], timeout: int = 300) -> List[subprocess.CompletedProcess]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1.

    The rendezvous store is hosted here, by the test, on a port the kernel picks while binding it (no race for
    a free port), and it outlives both agents: an agent that hosts the store itself closes it when its node is
    done, and the other agent, still at its exit barrier, would then fail to read from it."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = []
    for _ in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", "two-nodes",
               "--rdzv-conf", "is_host=false,join_timeout=120", str(WORKER), str(out), *map(str, ckpt_dirs)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:  # on a timeout or error, stop both agents and their workers (their own sessions)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        del store
    return results


def test_two_nodes_on_loopback(tmp_path, ckpts, reference):
    dirs = [ckpts["mha"][2], ckpts["gqa"][2]]
    nodes = run_two_nodes(tmp_path / "out", dirs)
    for node_index, node in enumerate(nodes):
        assert_clean_exit(node, f"torchrun --nnodes 2, agent {node_index}")
    ranks = read_ranks(tmp_path / "out", 2)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[1]["results"] == ranks[0]["results"]
    for name, folder in zip(("mha", "gqa"), dirs):
        assert_same(ranks[0]["results"][str(folder)], reference[name], f"{name}: 2 shards on 2 nodes x 1 process")
