"""PEFT LoRA adapters: `Llama.build(..., lora=PATH)` against PEFT itself.

The adapter is made by the peft library on transformers' model of the Hugging Face directory converted from a
random Meta checkpoint, with random non-zero A and B on all seven linear layers, and saved with
`save_pretrained`. This library, loading the original Meta checkpoint (or the converted directory) with that
adapter, must give PEFT's logits within 1e-4 in float32, with one process and with two.
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
from helpers import ROOT, SHAPES, TOKENIZER, make_checkpoint
from llama import Llama, Tokenizer
from llama import lora as lora_mod
from llama.checkpoints.checkpoint import random_state, split_dim, valid_model_parallel_sizes
from llama.checkpoints.convert import convert

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEEDS = {"mha": 31, "gqa": 32}
IDS = Tokenizer(TOKENIZER).encode(hf_worker.LOGIT_PROMPT, bos=True, eos=False)


def make_adapter(hf_dir: Path, out: Path, seed: int, **options) -> "peft.PeftModel":
    """A PEFT LoRA adapter (r=4, alpha=8, all seven targets) with random non-zero A and B, saved to `out`."""
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, **options)
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # B starts at zero in PEFT: make the update real
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.eval()
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Dict[str, Dict[str, object]]:
    """Per shape: the Meta original, its Hugging Face conversion, a saved adapter and PEFT's logits with it."""
    root = tmp_path_factory.mktemp("lora")
    out: Dict[str, Dict[str, object]] = {}
    for name, args in SHAPES.items():
        meta = make_checkpoint(root / name, args, 1, state=random_state(args, seed=SEEDS[name]))
        hf_dir = convert(meta, root / f"{name}-hf", tokenizer_path=TOKENIZER)
        model = make_adapter(hf_dir, root / f"{name}-adapter", SEEDS[name])
        with torch.no_grad():
            logits = model(torch.tensor([IDS])).logits[0].float()
            with model.disable_adapter():
                base_logits = model(torch.tensor([IDS])).logits[0].float()
        out[name] = dict(meta=meta, hf=hf_dir, adapter=root / f"{name}-adapter", logits=logits, base=base_logits)
    return out


def our_logits(ckpt: Path, lora, dtype: str = "float32") -> torch.Tensor:
    generator = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=32, max_batch_size=1, device="cpu", dtype=dtype,
                            lora=None if lora is None else str(lora))
    with torch.inference_mode():
        return generator.model(torch.tensor([IDS]), 0)[0]


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("base", ["meta", "hf"])
def test_one_process_matches_peft(setup, name, base):
    case = setup[name]
    got = our_logits(case[base], case["adapter"])
    torch.testing.assert_close(got, case["logits"], atol=1e-4, rtol=0)
    assert (case["logits"] - case["base"]).abs().max() > 0.1  # the adapter really changes the model


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, setup):
    specs = [f"{setup[n]['meta']}:{setup[n]['adapter']}" for n in sorted(SHAPES)]
    specs.append(f"{setup['gqa']['hf']}:{setup['gqa']['adapter']}")
    specs.append(f"{setup['gqa']['meta']}:+{setup['gqa']['adapter']}")  # beside the base (lora_bank.py)
    return hf_worker.launch(tmp_path_factory.mktemp("lora_mp2"), specs, nproc=2)


@pytest.mark.parametrize("name, base", [("mha", "meta"), ("gqa", "meta"), ("gqa", "hf")])
def test_two_processes_match_peft(setup, two_processes, name, base):
    """torchrun, 2 processes: each merges its own slice of B @ A (rows of q/k/v/gate/up, columns of o/down)."""
    got = two_processes[f"{setup[name][base]}:{setup[name]['adapter']}"]["logits"]
    torch.testing.assert_close(got, setup[name]["logits"], atol=1e-4, rtol=0)


def test_two_processes_adapter_beside_the_base(setup, two_processes):
    """The adapter kept beside the unmerged base, each process holding A and B sliced like its weights: PEFT's
    logits, and the merged two-process run's greedy tokens and log-probs."""
    case = setup["gqa"]
    beside = two_processes[f"{case['meta']}:+{case['adapter']}"]
    merged = two_processes[f"{case['meta']}:{case['adapter']}"]
    torch.testing.assert_close(beside["logits"], case["logits"], atol=1e-4, rtol=0)
    assert beside["tokens"] == merged["tokens"]
    for got, want in zip(beside["logprobs"], merged["logprobs"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_rank_slices_of_the_update_make_the_whole(setup, name):
    """Each rank's slice of scale * B @ A, joined along the split dim, is the one-process update."""
    args = SHAPES[name]
    adapter = lora_mod.read_adapter(setup[name]["adapter"], args)
    assert len(adapter.weights) == 7 * args.n_layers and adapter.scale == 2.0
    for world in valid_model_parallel_sizes(args)[1:]:
        for key in adapter.weights:
            whole = lora_mod.lora_delta(adapter, key, 0, 1, args)
            parts = [lora_mod.lora_delta(adapter, key, r, world, args) for r in range(world)]
            torch.testing.assert_close(torch.cat(parts, dim=split_dim(key)), whole, atol=1e-6, rtol=0)


def test_bin_adapter_and_bfloat16(setup, tmp_path):
    """adapter_model.bin (read with weights_only) gives the same weights; bfloat16 (packed on CPU) stays close."""
    case = setup["gqa"]
    binary = tmp_path / "bin"
    shutil.copytree(case["adapter"], binary)
    from safetensors.torch import load_file

    torch.save(load_file(str(binary / "adapter_model.safetensors")), binary / "adapter_model.bin")
    (binary / "adapter_model.safetensors").unlink()
    assert torch.equal(our_logits(case["meta"], binary), our_logits(case["meta"], case["adapter"]))
    low = our_logits(case["meta"], case["adapter"], dtype="bfloat16")
    assert (low - case["logits"]).abs().max() < 0.25 * (case["logits"] - case["base"]).abs().max()


def test_rslora_scale(setup, tmp_path):
    case = setup["mha"]
    model = make_adapter(case["hf"], tmp_path / "rs", seed=5, use_rslora=True)
    with torch.no_grad():
        expected = model(torch.tensor([IDS])).logits[0].float()
    assert lora_mod.read_adapter(tmp_path / "rs", SHAPES["mha"]).scale == 8 / 2  # alpha / sqrt(r)
    torch.testing.assert_close(our_logits(case["meta"], tmp_path / "rs"), expected, atol=1e-4, rtol=0)


# --- bad adapters: a clear error naming the value, before any weight is read ---------------------------------


def edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "use_dora"),
    (dict(bias="all"), "bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\]"),
    (dict(target_modules=["q_proj"]), r"_proj\.lora_A\.weight, for a module that target_modules \['q_proj'\]"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(r=8), r"lora_A \(4, \d+\).* needs \(8, \d+\)"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
])
def test_unsupported_adapter_config_is_a_clear_error(setup, tmp_path, capsys, change, message):
    bad = edited(setup["gqa"]["adapter"], tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=message):
        our_logits(setup["gqa"]["meta"], bad)
    assert "Loading" not in capsys.readouterr().out


def test_adapter_of_another_shape_is_a_clear_error(setup, capsys):
    with pytest.raises(ValueError, match="made for another model"):
        our_logits(setup["gqa"]["meta"], setup["mha"]["adapter"])
    assert "Loading" not in capsys.readouterr().out


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(self_attn|mlp)\.\w+_proj"])
def test_target_modules_as_peft_writes_them(setup, tmp_path, targets):
    """target_modules may be PEFT's "all-linear" or a regular expression over the module names."""
    case = setup["gqa"]
    other = edited(case["adapter"], tmp_path / "other", target_modules=targets)
    assert torch.equal(our_logits(case["meta"], other), our_logits(case["meta"], case["adapter"]))
    with pytest.raises(ValueError, match=r"selects \['lm_head'\]"):
        our_logits(case["meta"], edited(case["adapter"], tmp_path / "head", target_modules=r".*(_proj|lm_head)"))


def test_missing_adapter_files(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        our_logits(setup["mha"]["meta"], tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        our_logits(setup["mha"]["meta"], empty)
    shutil.copy(setup["mha"]["adapter"] / "adapter_config.json", empty)
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors or adapter_model.bin"):
        our_logits(setup["mha"]["meta"], empty)


def test_code_in_a_bin_adapter_is_refused(setup, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(setup["mha"]["adapter"] / "adapter_config.json", folder)
    torch.save({"x": torch.zeros(1), "f": print}, folder / "adapter_model.bin")  # a pickle naming a function
    with pytest.raises(ValueError, match="refusing to load"):
        our_logits(setup["mha"]["meta"], folder)


def test_example_script_and_chat_take_lora(setup, capsys):
    """--lora reaches Llama.build from the example scripts and chat.py."""
    import example_text_completion

    case = setup["mha"]
    example_text_completion.main(ckpt_dir=str(case["meta"]), tokenizer_path=str(TOKENIZER), temperature=0,
                                 max_gen_len=3, device="cpu", dtype="float32", lora=str(case["adapter"]))
    out = capsys.readouterr().out
    with_lora = [line for line in out.splitlines() if line.startswith("> ")]
    # What was merged is said, with the adapter's own settings (r=4, alpha=8: peft's config above).
    n_layers = SHAPES["mha"].n_layers
    assert (f"merged LoRA adapter {case['adapter']} (r 4, alpha 8, scale 2) into {7 * n_layers} weights of "
            f"{n_layers} layers") in out, out
    example_text_completion.main(ckpt_dir=str(case["meta"]), tokenizer_path=str(TOKENIZER), temperature=0,
                                 max_gen_len=3, device="cpu", dtype="float32")
    without = [line for line in capsys.readouterr().out.splitlines() if line.startswith("> ")]
    assert len(with_lora) == len(without) == 4 and with_lora != without
    proc = run_python("chat.py", "--ckpt_dir", str(case["meta"]), "--tokenizer_path", str(TOKENIZER), "--lora",
                      str(case["meta"] / "no-adapter"), cwd=ROOT, timeout=120,
                      env=dict(os.environ, PYTHONPATH=str(ROOT)))  # forked (tests/forked.py)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: LoRA adapter directory")
