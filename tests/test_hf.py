"""Hugging Face's layout, both ways: `python -m llama convert` and `Llama.build` on a Hugging Face directory.

transformers is the independent oracle: it must load the converted directory with `from_pretrained` and agree
with this library on the original Meta checkpoint (log-probs within 1e-4 in float32, the same greedy tokens).
Meta -> Hugging Face -> Meta must give back the same bytes of every weight, and every rank's slice read from
Hugging Face's files must be exactly that rank's slice of the original.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

import hf_worker
from forked import run_python
from helpers import GQA, ROOT, SHAPES, TOKENIZER, make_checkpoint
from llama import Llama, ModelArgs, Tokenizer
from llama import convert as convert_mod
from llama import hf
from llama.checkpoints.checkpoint import find_shards, random_state, split_state, valid_model_parallel_sizes
from llama.checkpoints.convert import convert
from llama.programs.convert import main
from llama.model import PRESETS

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402

transformers.logging.set_verbosity_error()
PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time",
    "Grouped-query attention shares keys and values between heads. 42 × 7 = 294; 😀 世界",
]
GEN_LEN = 10
SEEDS = {"mha": 21, "gqa": 22}


@pytest.fixture(scope="module")
def states() -> Dict[str, Dict[str, torch.Tensor]]:
    return {name: random_state(args, seed=SEEDS[name]) for name, args in SHAPES.items()}


@pytest.fixture(scope="module")
def meta(tmp_path_factory, states) -> Dict[str, Path]:
    """The originals, in 2 shards: the conversion joins them layer by layer."""
    root = tmp_path_factory.mktemp("meta")
    return {name: make_checkpoint(root / name, SHAPES[name], 2, state=states[name]) for name in SHAPES}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, meta) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    for name in SHAPES:
        assert main([str(meta[name]), str(root / name), "--tokenizer_path", str(TOKENIZER)]) == 0
    return {name: root / name for name in SHAPES}


def load_shards(folder: Path):
    return [torch.load(p, map_location="cpu", weights_only=True) for p in find_shards(folder)]


def same_model(a: ModelArgs, b: ModelArgs) -> bool:
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "ffn_hidden_dim", "norm_eps", "rope_theta")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


# --- the files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_round_trip_is_bit_exact(tmp_path, name, states, meta, hf_dirs):
    """Meta (2 shards) -> Hugging Face -> Meta with 1 and 2 shards: every weight identical, rope.freqs too."""
    for mp in (1, 2):
        back = tmp_path / f"mp{mp}"
        assert main([str(hf_dirs[name]), str(back), "--mp", str(mp)]) == 0
        got, want = load_shards(back), list(split_state(states[name], mp))
        assert len(got) == mp
        for g, w in zip(got, want):
            assert sorted(g) == sorted(w)
            for key in w:
                assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), f"{key} differs ({mp} shards)"
        params = json.loads((back / "params.json").read_text())
        assert params["vocab_size"] == -1  # as Meta's released files say
        original = ModelArgs.from_params(json.loads((meta[name] / "params.json").read_text()))
        assert same_model(ModelArgs.from_params(params), original)
        assert (back / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()


@pytest.mark.parametrize("preset", ["7B", "13B", "70B"])
def test_released_params_survive_config_json(preset):
    """params.json -> config.json -> params.json gives the released file back (config.json keeps only the FFN size)."""
    args = ModelArgs(**PRESETS[preset])
    params = hf.params_from_config(hf.config_from_args(args))
    assert ModelArgs.from_params(params).to_params(vocab_size=-1) == args.to_params(vocab_size=-1)


def test_config_json_is_what_transformers_writes(hf_dirs):
    config = json.loads((hf_dirs["gqa"] / "config.json").read_text())
    theirs = transformers.AutoConfig.from_pretrained(hf_dirs["gqa"])
    assert type(theirs).__name__ == "LlamaConfig" and config["architectures"] == ["LlamaForCausalLM"]
    assert (theirs.hidden_size, theirs.intermediate_size, theirs.num_attention_heads, theirs.num_key_value_heads,
            theirs.num_hidden_layers, theirs.vocab_size) == (128, GQA.ffn_hidden_dim, 8, 2, 2, 32000)
    assert config["max_position_embeddings"] == 4096 and config["torch_dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (1, 2, False)
    assert json.loads((hf_dirs["gqa"] / "generation_config.json").read_text())["eos_token_id"] == 2
    assert sorted(p.name for p in hf_dirs["gqa"].iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json"]


def test_converts_one_layer_at_a_time(tmp_path, meta, monkeypatch):
    """A multi-shard source is joined and converted group by group (embeddings, one layer, norm and output), and
    the tokenizer is found in the folder above the checkpoint, where download.sh puts it."""
    groups = []
    real = hf.to_hf_state
    monkeypatch.setattr(hf, "to_hf_state",
                        lambda state, args, *spec: groups.append(sorted(state)) or real(state, args, *spec))
    shutil.copytree(meta["gqa"], tmp_path / "llama-2-tiny")
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")
    convert(tmp_path / "llama-2-tiny", tmp_path / "out")
    assert groups[0] == ["tok_embeddings.weight"] and groups[-1] == ["norm.weight", "output.weight"]
    assert [len(g) for g in groups[1:-1]] == [9] * GQA.n_layers
    assert all(len({k.split(".")[1] for k in g}) == 1 for g in groups[1:-1])  # one layer per group


def test_forced_shards_with_an_index(tmp_path, meta, hf_dirs):
    """A small size limit gives several files plus an index; transformers and this library read them alike."""
    dst = tmp_path / "sharded"
    limit = 200_000
    convert(meta["mha"], dst, tokenizer_path=TOKENIZER, max_shard_bytes=limit)
    files = sorted(dst.glob("*.safetensors"))
    assert len(files) > 2 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((dst / hf.INDEX).read_text())
    with safe_open(str(hf_dirs["mha"] / "model.safetensors"), "pt") as single:
        names = set(single.keys())
        assert set(index["weight_map"]) == names
        total = 0
        for f in files:
            with safe_open(str(f), "pt") as part:
                size = sum(part.get_tensor(k).numel() * 2 for k in part.keys())
                assert size <= limit or len(list(part.keys())) == 1  # one tensor above the limit stays whole
                for key in part.keys():
                    assert index["weight_map"][key] == f.name
                    assert torch.equal(part.get_tensor(key), single.get_tensor(key))
                total += size
    assert index["metadata"]["total_size"] == total
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["mha"], dtype=torch.float32)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    info = hf.inspect_checkpoint(dst)
    assert info.n_shards == len(files)
    got = hf.load_rank_state(info.shards, 1, 2)
    want = hf.load_rank_state(hf.inspect_checkpoint(hf_dirs["mha"]).shards, 1, 2)
    assert all(torch.equal(got[k], want[k]) for k in want) and sorted(got) == sorted(want)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_rank_slice_is_the_slice_of_the_original(name, states, hf_dirs):
    """Un-permuting each rank's whole heads gives exactly that rank's rows of the un-permuted matrix."""
    info = hf.inspect_checkpoint(hf_dirs[name])
    assert info.vocab_rows == 32000 and info.params["dim"] == SHAPES[name].dim
    for world in valid_model_parallel_sizes(SHAPES[name]):
        want = list(split_state(states[name], world))
        for rank in range(world):
            for mmap in (True, False):
                got = hf.load_rank_state(info.shards, rank, world, mmap=mmap)
                assert sorted(got) == sorted(want[rank])
                for key, tensor in want[rank].items():
                    assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (key, rank, world)
    cast = hf.load_rank_state(info.shards, 0, 1, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in cast.values())


def test_tokenizer_loads_in_transformers(hf_dirs):
    pytest.importorskip("google.protobuf", reason="transformers reads a SentencePiece tokenizer.model with protobuf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dirs["mha"])
    ours = Tokenizer(hf_dirs["mha"] / "tokenizer.model")
    for text in PROMPTS:
        assert tokenizer(text)["input_ids"] == ours.encode(text, bos=True, eos=False)


# --- transformers on the converted directory == this library on the original -----------------------------


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, meta, hf_dirs):
    name = request.param
    ours = Llama.build(str(meta[name]), str(TOKENIZER), max_seq_len=128, max_batch_size=len(PROMPTS),
                       device="cpu", dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float32).eval()
    return name, ours, theirs


def test_transformers_log_probs_match(pair):
    _, ours, theirs = pair
    result = ours.text_completion(PROMPTS, temperature=0, max_gen_len=0, logprobs=True, echo=True)
    for prompt, res in zip(PROMPTS, result):
        ids = ours.tokenizer.encode(prompt, bos=True, eos=False)
        with torch.no_grad():
            logits = theirs(torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res["logprobs"][1:]), expected, atol=1e-4, rtol=0)


def test_transformers_greedy_tokens_match(pair):
    _, ours, theirs = pair
    prompt_tokens = [ours.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, _ = ours.generate(prompt_tokens, max_gen_len=GEN_LEN, temperature=0)
    for ids, got in zip(prompt_tokens, tokens):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([ids]), max_new_tokens=GEN_LEN, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        expected = out[0, len(ids):].tolist()
        assert got == (expected[: expected.index(2)] if 2 in expected else expected)


# --- Llama.build on a Hugging Face directory ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_build_from_hf_dir_equals_build_from_meta(name, dtype, meta, hf_dirs, capsys):
    """The same weights, so the same logits, bit for bit; bfloat16 on CPU also takes the packed-weight path."""
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
    logits = []
    for folder, tokenizer in ((meta[name], TOKENIZER), (hf_dirs[name], hf_dirs[name] / "tokenizer.model")):
        generator = Llama.build(str(folder), str(tokenizer), max_seq_len=16, max_batch_size=1, device="cpu",
                                dtype=dtype)
        with torch.inference_mode():
            logits.append(generator.model(ids, 0))
    assert torch.equal(logits[0], logits[1])
    assert "Loading 1 shard(s)" in capsys.readouterr().out  # the Hugging Face directory: one safetensors file


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, hf_dirs):
    return hf_worker.launch(tmp_path_factory.mktemp("hf_mp2"), [str(hf_dirs[n]) for n in sorted(SHAPES)], nproc=2)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_two_processes_on_a_hf_dir(name, meta, hf_dirs, two_processes):
    """torchrun, 2 processes, each slicing Hugging Face's files: the one-process result on Meta's original."""
    ref = hf_worker.run_for(str(meta[name]))
    got = two_processes[str(hf_dirs[name])]
    assert got["tokens"] == ref["tokens"]
    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=0)
    worst = max(abs(a - b) for r, q in zip(got["logprobs"], ref["logprobs"]) for a, b in zip(r, q))
    assert worst <= 1e-4


# --- bad input: a clear error naming the value, before any weight is read -----------------------------------


def hf_copy(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of a Hugging Face directory (weights hard-linked) with config.json fields changed (None: removed)."""
    dst.mkdir()
    for path in src.iterdir():
        os.link(path, dst / path.name) if path.suffix == ".safetensors" else shutil.copy(path, dst / path.name)
    config = json.loads((src / "config.json").read_text())
    for key, value in config_changes.items():
        config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
    (dict(architectures=["MistralForCausalLM"]), "architectures"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),  # true is Llama 3.2's: test_family_parity
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size="128"), "hidden_size"),
    (dict(intermediate_size=500), r"model\.layers\.0\.mlp\.\w+_proj\.weight in .* has shape"),
    (dict(num_hidden_layers=3), r"missing \['model\.layers\.2\."),
    (dict(vocab_size=32001), r"(lm_head|model\.embed_tokens)\.weight in .* has shape"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, hf_dirs, capsys, change, message):
    folder = hf_copy(hf_dirs["gqa"], tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=message):
        Llama.build(str(folder), str(TOKENIZER), 32, 1, device="cpu")
    assert "Loading" not in capsys.readouterr().out


def test_missing_weight_files_are_named(tmp_path, meta, hf_dirs):
    sharded = tmp_path / "sharded"
    convert(meta["mha"], sharded, tokenizer_path=TOKENIZER, max_shard_bytes=200_000)
    second = sorted(sharded.glob("*.safetensors"))[1]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing .*{second.name}"):
        hf.inspect_checkpoint(sharded)
    (sharded / hf.INDEX).unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json"):
        hf.inspect_checkpoint(sharded)
    bins = hf_copy(hf_dirs["mha"], tmp_path / "bins")
    (bins / "model.safetensors").rename(bins / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*only safetensors"):
        Llama.build(str(bins), str(TOKENIZER), 32, 1, device="cpu")


def test_extra_tensors_are_an_error(tmp_path, hf_dirs):
    from safetensors.torch import load_file, save_file

    folder = hf_copy(hf_dirs["mha"], tmp_path / "extra")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    (folder / "model.safetensors").unlink()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"):
        hf.inspect_checkpoint(folder)


# --- the command line: never overwrite, atomic, one-line errors -----------------------------------------------


def test_refuses_to_overwrite(tmp_path, meta, hf_dirs, capsys):
    before = {p.name: p.read_bytes() for p in hf_dirs["mha"].iterdir()}
    assert main([str(meta["mha"]), str(hf_dirs["mha"]), "--tokenizer_path", str(TOKENIZER)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in hf_dirs["mha"].iterdir()} == before
    assert main([str(hf_dirs["mha"]), str(meta["mha"])]) == 2  # nor a Meta checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert main([str(meta["mha"]), str(partial), "--tokenizer_path", str(TOKENIZER)]) == 2
    assert "interrupted write" in capsys.readouterr().err
    assert main([str(hf_dirs["mha"]), str(hf_dirs["mha"])]) == 2
    assert "same directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{hf}", "{dst}", "--to", "hf"], "already in Hugging Face's layout"),
    (["{meta}", "{dst}", "--to", "meta"], "python -m llama reshard"),
    (["{meta}", "{dst}", "--mp", "2", "--tokenizer_path", "{tok}"], "--mp is for --to meta"),
    (["{hf}", "{dst}", "--mp", "3"], "valid process counts: [1, 2, 4]"),
    (["{hf}", "{dst}", "--mp", "0"], "valid values for this checkpoint: [1, 2, 4]"),
    (["{meta}", "{dst}"], "no tokenizer.model"),
    (["{meta}", "{dst}", "--tokenizer_path", "{tok}", "--max_shard_size", "5 parsecs"], "--max_shard_size"),
    (["{dst}", "{dst}2"], "does not exist"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, meta, hf_dirs, capsys, argv, message):
    values = dict(hf=hf_dirs["mha"], meta=meta["mha"], dst=tmp_path / "dst", tok=TOKENIZER)
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "dst").exists()  # nothing is created before the checks pass


@pytest.mark.parametrize("direction", ["hf", "meta"])
def test_interrupted_write_leaves_no_file(tmp_path, meta, hf_dirs, monkeypatch, capsys, direction):
    """Ctrl-C while the second weight file is written: exit 130, and no file is left under any final name."""
    import llama.checkpoints.hf_write as hf_write
    import llama.checkpoints.writing as ckpt_mod

    real, weights = ckpt_mod.atomic_save, []

    def interrupt_on_second_weights(obj, path):
        if Path(path).suffix in (".safetensors", ".pth"):
            weights.append(path)
            if len(weights) == 2:
                raise KeyboardInterrupt
        return real(obj, path)

    for module in (hf_write, ckpt_mod, convert_mod):  # each holds its own reference to the function
        monkeypatch.setattr(module, "atomic_save", interrupt_on_second_weights)
    if direction == "hf":
        argv = [str(meta["mha"]), str(tmp_path / "dst"), "--tokenizer_path", str(TOKENIZER),
                "--max_shard_size", "200KB"]
    else:
        argv = [str(hf_dirs["mha"]), str(tmp_path / "dst"), "--mp", "2"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(weights) == 2 and os.listdir(tmp_path / "dst") == []


def test_command_line_entry_point(tmp_path, hf_dirs):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = run_python("-m", "llama", "convert", str(hf_dirs["mha"]), str(tmp_path / "m"), "--mp", "4", cwd=ROOT,
                      env=env, timeout=120)  # forked from a process that has imported torch (tests/forked.py)
    assert proc.returncode == 0, proc.stderr
    assert len(find_shards(tmp_path / "m")) == 4 and "[4/4] consolidated.03.pth" in proc.stdout
